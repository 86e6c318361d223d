//! What the init should do: read from the initramfs config file, then overridden by
//! `keel.*` parameters on the kernel command line.
//!
//! Config file (`/etc/keel/init.conf`, written by `keel-image`): one `key=value` per
//! line, `#` starts a comment line. Keys: `app`, `arg` (repeated), `env` (repeated,
//! `NAME=value`), `module` (repeated, in load order), `ip` (`A.B.C.D/prefix`), `gw`,
//! `mtu`, `ifname`, `root`, `rootfstype`, `rootmount`, `rootflags` (`ro` or `rw`).
//!
//! Kernel command line: `keel.KEY=value` for the same keys, except that `keel.app`
//! takes the whole command (program and arguments, split on spaces; quote it:
//! `keel.app="/app/run --fast"`) and `keel.module` is not accepted.

use std::net::Ipv4Addr;

use thiserror::Error;

/// Path of the config file inside the initramfs.
pub const CONFIG_PATH: &str = "/etc/keel/init.conf";

/// Errors in the config file or the command line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A line of the config file has no `=`.
    #[error("{CONFIG_PATH} line {line}: expected key=value, got {text:?}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// The offending line.
        text: String,
    },
    /// A key the init does not know.
    #[error("{source_name}: unknown key {key:?}")]
    UnknownKey {
        /// Where the key came from.
        source_name: &'static str,
        /// The key.
        key: String,
    },
    /// A value that does not parse.
    #[error("{source_name}: bad value {value:?} for {key}: expected {expected}")]
    BadValue {
        /// Where the value came from.
        source_name: &'static str,
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// Nothing to run.
    #[error("no application: set app= in {CONFIG_PATH} or keel.app= on the kernel command line")]
    NoApp,
}

/// IPv4 address with prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpCidr {
    /// Address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

impl IpCidr {
    /// The netmask for the prefix length.
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        Ipv4Addr::from(bits)
    }
}

/// Everything the init does, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Config {
    /// Program and arguments of the application.
    pub app: Vec<String>,
    /// Environment of the application (besides PATH).
    pub env: Vec<(String, String)>,
    /// Kernel modules to load, in order.
    pub modules: Vec<String>,
    /// Interface address.
    pub ip: Option<IpCidr>,
    /// Default gateway.
    pub gw: Option<Ipv4Addr>,
    /// Interface MTU.
    pub mtu: Option<u32>,
    /// Interface name (default: the first one that is not `lo`).
    pub ifname: Option<String>,
    /// Root block device.
    pub root: Option<String>,
    /// Root file system type.
    pub rootfstype: Option<String>,
    /// Where the root file system is mounted.
    pub rootmount: Option<String>,
    /// Mount the root read-only.
    pub root_ro: bool,
}

impl Config {
    /// Applies the config file text.
    pub fn apply_file(&mut self, text: &str) -> Result<(), ConfigError> {
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(ConfigError::Syntax {
                    line: i + 1,
                    text: raw.to_string(),
                });
            };
            match key {
                "app" => self.app.insert(0, value.to_string()),
                "arg" => self.app.push(value.to_string()),
                "module" => self.modules.push(value.to_string()),
                _ => self.apply_common(CONFIG_PATH, key, value)?,
            }
        }
        Ok(())
    }

    /// Applies the `keel.*` parameters of the kernel command line; others are ignored.
    pub fn apply_cmdline(&mut self, cmdline: &str) -> Result<(), ConfigError> {
        const SRC: &str = "kernel command line";
        for token in split_cmdline(cmdline) {
            let Some(rest) = token.strip_prefix("keel.") else {
                continue;
            };
            let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
            match key {
                "app" => {
                    self.app = value.split_whitespace().map(str::to_string).collect();
                }
                _ => self.apply_common(SRC, key, value)?,
            }
        }
        Ok(())
    }

    fn apply_common(
        &mut self,
        source_name: &'static str,
        key: &str,
        value: &str,
    ) -> Result<(), ConfigError> {
        let bad = |expected| ConfigError::BadValue {
            source_name,
            key: key.to_string(),
            value: value.to_string(),
            expected,
        };
        match key {
            "env" => {
                let (name, val) = value
                    .split_once('=')
                    .filter(|(n, _)| !n.is_empty())
                    .ok_or_else(|| bad("NAME=value"))?;
                self.env.push((name.to_string(), val.to_string()));
            }
            "ip" => self.ip = Some(parse_cidr(value).ok_or_else(|| bad("A.B.C.D/PREFIX"))?),
            "gw" => self.gw = Some(value.parse().map_err(|_| bad("an IPv4 address"))?),
            "mtu" => {
                let mtu: u32 = value.parse().map_err(|_| bad("a number 68..=65535"))?;
                if !(68..=65535).contains(&mtu) {
                    return Err(bad("a number 68..=65535"));
                }
                self.mtu = Some(mtu);
            }
            "ifname" => {
                if value.is_empty() || value.len() > 15 || value.contains('/') {
                    return Err(bad("an interface name of 1 to 15 characters"));
                }
                self.ifname = Some(value.to_string());
            }
            "root" => self.root = Some(non_empty(value).ok_or_else(|| bad("a device path"))?),
            "rootfstype" => {
                self.rootfstype = Some(non_empty(value).ok_or_else(|| bad("ext4 or erofs"))?)
            }
            "rootmount" => {
                if !value.starts_with('/') || value == "/" {
                    return Err(bad("an absolute directory path other than /"));
                }
                self.rootmount = Some(value.to_string());
            }
            "rootflags" => {
                self.root_ro = match value {
                    "ro" => true,
                    "rw" => false,
                    _ => return Err(bad("ro or rw")),
                }
            }
            _ => {
                return Err(ConfigError::UnknownKey {
                    source_name,
                    key: key.to_string(),
                })
            }
        }
        Ok(())
    }

    /// Checks that there is something to run.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.app.first() {
            Some(p) if !p.is_empty() => Ok(()),
            _ => Err(ConfigError::NoApp),
        }
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn parse_cidr(s: &str) -> Option<IpCidr> {
    let (addr, prefix) = s.split_once('/')?;
    let prefix: u8 = prefix.parse().ok()?;
    (prefix <= 32).then_some(())?;
    Some(IpCidr {
        addr: addr.parse().ok()?,
        prefix,
    })
}

/// Splits a kernel command line like the kernel does: on whitespace, with double
/// quotes grouping (the quotes themselves are removed).
pub fn split_cmdline(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut any = false;
    for c in s.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                any = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_cmdline() {
        let mut c = Config::default();
        c.apply_file(
            "# comment\napp=/app/run\narg=--x\narg=a b\nenv=K=v=w\nmodule=/lib/modules/a.ko\nip=10.0.0.2/24\nmtu=1400\n",
        )
        .unwrap();
        assert_eq!(c.app, ["/app/run", "--x", "a b"]);
        assert_eq!(c.env, [("K".to_string(), "v=w".to_string())]);
        c.apply_cmdline(
            "console=ttyS0 keel.app=\"/bin/sh -c true\" keel.gw=10.0.0.1 keel.root=/dev/vda keel.rootfstype=erofs keel.rootflags=ro",
        )
        .unwrap();
        assert_eq!(c.app, ["/bin/sh", "-c", "true"]);
        assert_eq!(c.gw, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(c.ip.unwrap().netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.root.as_deref(), Some("/dev/vda"));
        assert!(c.root_ro);
        assert_eq!(c.mtu, Some(1400));
        c.validate().unwrap();
    }

    #[test]
    fn errors() {
        let mut c = Config::default();
        assert!(matches!(
            c.apply_file("junk"),
            Err(ConfigError::Syntax { line: 1, .. })
        ));
        assert!(matches!(
            c.apply_cmdline("keel.nope=1"),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert!(matches!(
            c.apply_cmdline("keel.ip=10.0.0.1"),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            c.apply_cmdline("keel.ip=10.0.0.1/33"),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            c.apply_cmdline("keel.mtu=9"),
            Err(ConfigError::BadValue { .. })
        ));
        assert_eq!(c.validate(), Err(ConfigError::NoApp));
        assert!(matches!(
            c.apply_cmdline("keel.module=/x.ko"),
            Err(ConfigError::UnknownKey { .. })
        ));
    }

    #[test]
    fn split() {
        assert_eq!(
            split_cmdline("  a  b=\"c d\" \"\" e"),
            ["a", "b=c d", "", "e"]
        );
        assert_eq!(
            IpCidr {
                addr: Ipv4Addr::UNSPECIFIED,
                prefix: 0
            }
            .netmask(),
            Ipv4Addr::UNSPECIFIED
        );
    }
}
