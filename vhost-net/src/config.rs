//! Command line and TOML configuration, turned into a validated [`SwitchConfig`].
//!
//! One process serves one switch. Its ports come from repeated
//! `--port name=p0,socket=PATH[,mac=52:54:00:00:00:01]` options or from `[[port]]`
//! tables in a TOML file (`--config`). Every TOML error names the file, `line:column`
//! and what was expected.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// Largest queue size virtio allows for split rings.
const MAX_QUEUE_SIZE: u16 = 32768;
/// Longest port name (it appears in logs and control-socket replies).
pub const MAX_NAME_LEN: usize = 64;

pub use keel_config_error::ConfigError;

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Whether the group bit is set (multicast or broadcast).
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("expected a MAC address like 52:54:00:12:34:56, found {s:?}");
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Most queue pairs per port.
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// One sandbox port: a vhost-user socket the backend listens on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// Unique name within the switch.
    pub name: String,
    /// vhost-user socket path (the backend is the server).
    pub socket: PathBuf,
    /// The guest's MAC. When set, frames from the port with another source MAC are
    /// dropped (anti-spoofing) and the MAC is offered in the virtio-net config space.
    #[serde(default)]
    pub mac: Option<Mac>,
    /// Queue pairs (MQ when above 1), one worker thread each.
    #[serde(default = "one")]
    pub queues: u16,
    /// CPUs the workers are pinned to: worker `i` on `cpu[i % len]` (empty: no
    /// pinning). TOML: `cpu = 2` or `cpu = [2, 3]`; command line: `cpu=2` or `cpu=2/3`.
    #[serde(default, deserialize_with = "cpu_list")]
    pub cpu: Vec<usize>,
    /// Bits per second the port may send into the switch (0: unlimited).
    #[serde(default)]
    pub rate_bps: u64,
    /// Packets per second the port may send into the switch (0: unlimited).
    #[serde(default)]
    pub rate_pps: u64,
}

fn one() -> u16 {
    1
}

fn cpu_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<usize>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(usize),
        Many(Vec<usize>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(c) => vec![c],
        OneOrMany::Many(v) => v,
    })
}

impl Default for PortConfig {
    fn default() -> Self {
        PortConfig {
            name: String::new(),
            socket: PathBuf::new(),
            mac: None,
            queues: 1,
            cpu: Vec::new(),
            rate_bps: 0,
            rate_pps: 0,
        }
    }
}

impl PortConfig {
    /// Checks the values that serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > MAX_NAME_LEN {
            return Err(format!(
                "name: expected 1 to {MAX_NAME_LEN} bytes, found {}",
                self.name.len()
            ));
        }
        if !self
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(format!(
                "name: expected letters, digits, '-', '_' or '.', found {:?}",
                self.name
            ));
        }
        if self.socket.as_os_str().is_empty() {
            return Err("socket: must not be empty".into());
        }
        if let Some(mac) = self.mac {
            if mac.is_multicast() || mac.0 == [0; 6] {
                return Err(format!("mac: expected a unicast address, found {mac}"));
            }
        }
        if self.queues == 0 || self.queues > MAX_QUEUE_PAIRS {
            return Err(format!(
                "queues: expected 1 to {MAX_QUEUE_PAIRS} queue pairs, found {}",
                self.queues
            ));
        }
        if let Some(c) = self.cpu.iter().find(|&&c| c >= libc::CPU_SETSIZE as usize) {
            return Err(format!("cpu: {c} is not a valid CPU number"));
        }
        Ok(())
    }
}

impl FromStr for PortConfig {
    type Err = String;

    /// Parses `name=p0,socket=PATH[,mac=MAC][,queues=N][,cpu=C[/C..]][,rate_bps=N]
    /// [,rate_pps=N]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut name, mut socket) = (None, None);
        let mut port = PortConfig::default();
        let num = |k: &str, v: &str| -> Result<u64, String> {
            v.parse::<u64>()
                .map_err(|_| format!("{k}: expected a number, found {v:?}"))
        };
        for item in s.split(',') {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, found {item:?}"))?;
            match k {
                "name" => name = Some(v.to_string()),
                "socket" => socket = Some(PathBuf::from(v)),
                "mac" => port.mac = Some(v.parse::<Mac>()?),
                "queues" => {
                    port.queues = u16::try_from(num(k, v)?)
                        .map_err(|_| format!("queues: {v} is too large"))?
                }
                "cpu" => {
                    port.cpu = v
                        .split('/')
                        .map(|c| num(k, c).map(|c| c as usize))
                        .collect::<Result<_, _>>()?
                }
                "rate_bps" => port.rate_bps = num(k, v)?,
                "rate_pps" => port.rate_pps = num(k, v)?,
                _ => {
                    return Err(format!(
                        "unknown key {k:?}: expected name, socket, mac, queues, cpu, rate_bps or rate_pps"
                    ))
                }
            }
        }
        port.name = name.ok_or("missing name=")?;
        port.socket = socket.ok_or("missing socket=")?;
        port.validate()?;
        Ok(port)
    }
}

/// A TAP uplink: the interface `dev` joins the switch as port `name`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TapConfig {
    /// Port name, unique among ports and uplinks.
    pub name: String,
    /// Interface name (created if it does not exist).
    pub dev: String,
    /// Checksum/segmentation offloads on this TAP (`None`: the switch's `offloads`).
    /// Off, the kernel sends and expects complete frames: GSO frames for it are
    /// segmented and checksums completed by the switch.
    #[serde(default)]
    pub offloads: Option<bool>,
}

impl TapConfig {
    /// Checks the values that serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        PortConfig {
            name: self.name.clone(),
            socket: PathBuf::from("tap"),
            ..PortConfig::default()
        }
        .validate()?;
        if self.dev.is_empty() || self.dev.len() > 15 || self.dev.contains(['/', '\0', ' ']) {
            return Err(format!(
                "dev: expected an interface name of 1 to 15 bytes, found {:?}",
                self.dev
            ));
        }
        Ok(())
    }
}

impl FromStr for TapConfig {
    type Err = String;

    /// Parses `name=up0,dev=tap0[,offloads=on|off]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut name, mut dev, mut offloads) = (None, None, None);
        for item in s.split(',') {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, found {item:?}"))?;
            match k {
                "name" => name = Some(v.to_string()),
                "dev" => dev = Some(v.to_string()),
                "offloads" => {
                    offloads = Some(match v {
                        "on" | "true" => true,
                        "off" | "false" => false,
                        _ => return Err(format!("offloads: expected on or off, found {v:?}")),
                    })
                }
                _ => return Err(format!("unknown key {k:?}: expected name, dev or offloads")),
            }
        }
        let tap = TapConfig {
            name: name.ok_or("missing name=")?,
            dev: dev.ok_or("missing dev=")?,
            offloads,
        };
        tap.validate()?;
        Ok(tap)
    }
}

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(
    name = "keel-vhost-net",
    version,
    about = "vhost-user network backend: a userspace L2 switch"
)]
pub struct Args {
    /// TOML file describing the switch (excludes --port).
    #[arg(long, value_name = "FILE", conflicts_with = "port")]
    pub config: Option<PathBuf>,
    /// Only validate the configuration, then exit.
    #[arg(long)]
    pub check: bool,
    /// A sandbox port: name=NAME,socket=PATH[,mac=MAC] (repeatable).
    #[arg(long, value_name = "SPEC")]
    pub port: Vec<PortConfig>,
    /// A TAP uplink: name=NAME,dev=IFNAME (repeatable).
    #[arg(long, value_name = "SPEC", conflicts_with = "config")]
    pub tap: Vec<TapConfig>,
    /// JSON-lines control socket (stats, add-port, remove-port).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Seconds a learned MAC stays valid without traffic from it.
    #[arg(long, default_value_t = 300)]
    pub mac_ageing: u64,
    /// Maximum size of each virtqueue.
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// Log one line of counters per port every N seconds (0: never).
    #[arg(long, default_value_t = 0)]
    pub stats_interval: u64,
    /// Busy-poll mode: after a kick keep polling the TX ring until it has been idle
    /// this many microseconds (0: event mode, sleep on kicks).
    #[arg(long, default_value_t = 0)]
    pub poll_us: u64,
    /// Busy-poll with shared threads, one pinned to each of these CPUs, each polling
    /// the TX rings of many ports (a port's queue pair goes to the thread on its
    /// `cpu=` when there is one, else to the least loaded). Needs --poll-us > 0.
    #[arg(long, value_name = "CPU,..", value_delimiter = ',')]
    pub poll_cpus: Vec<usize>,
    /// Offer checksum and segmentation offloads (CSUM, GUEST_CSUM, HOST_/GUEST_TSO4,
    /// TSO6, ECN, UFO) and enable them on TAP uplinks; the virtio-net header is passed
    /// between ports. GSO frames for a port that did not negotiate them are dropped.
    #[arg(long)]
    pub offloads: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    control: Option<PathBuf>,
    #[serde(default = "default_ageing")]
    mac_ageing: u64,
    #[serde(default = "default_queue_size")]
    queue_size: u16,
    #[serde(default)]
    stats_interval: u64,
    #[serde(default)]
    poll_us: u64,
    #[serde(default)]
    poll_cpus: Vec<usize>,
    #[serde(default)]
    offloads: bool,
    #[serde(default)]
    port: Vec<toml::Spanned<PortConfig>>,
    #[serde(default)]
    tap: Vec<toml::Spanned<TapConfig>>,
}

fn default_ageing() -> u64 {
    300
}
fn default_queue_size() -> u16 {
    256
}

/// A validated switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchConfig {
    /// The initial ports (more can be added through the control socket).
    pub ports: Vec<PortConfig>,
    /// TAP uplinks.
    pub taps: Vec<TapConfig>,
    /// Control socket path.
    pub control: Option<PathBuf>,
    /// How long a learned MAC stays valid without traffic.
    pub mac_ageing: Duration,
    /// Maximum queue size (power of two).
    pub queue_size: u16,
    /// Interval of the periodic stats log line; zero disables it.
    pub stats_interval: Duration,
    /// Busy-poll idle window; zero means event mode.
    pub poll: Duration,
    /// CPUs of the shared poll threads (empty: one polling worker per queue pair).
    pub poll_cpus: Vec<usize>,
    /// Whether offloads are offered.
    pub offloads: bool,
}

impl TapConfig {
    /// The port an uplink becomes (its "socket" is `tap:DEV`).
    pub fn as_port(&self) -> PortConfig {
        PortConfig {
            name: self.name.clone(),
            socket: PathBuf::from(format!("tap:{}", self.dev)),
            ..PortConfig::default()
        }
    }
}

impl SwitchConfig {
    /// Ports and uplinks, as ports.
    pub fn all_ports(&self) -> Vec<PortConfig> {
        let mut all = self.ports.clone();
        all.extend(self.taps.iter().map(TapConfig::as_port));
        all
    }

    fn validate(&self) -> Result<(), String> {
        if !self.queue_size.is_power_of_two() || self.queue_size > MAX_QUEUE_SIZE {
            return Err(format!(
                "queue_size: expected a power of two from 1 to {MAX_QUEUE_SIZE}, found {}",
                self.queue_size
            ));
        }
        if self.poll > Duration::from_secs(1) {
            return Err("poll_us: expected at most 1000000".into());
        }
        if !self.poll_cpus.is_empty() && self.poll.is_zero() {
            return Err("poll_cpus: shared poll threads need busy-poll mode (poll_us > 0)".into());
        }
        if let Some(c) = self
            .poll_cpus
            .iter()
            .find(|&&c| c >= libc::CPU_SETSIZE as usize)
        {
            return Err(format!("poll_cpus: {c} is not a valid CPU number"));
        }
        for (i, c) in self.poll_cpus.iter().enumerate() {
            if self.poll_cpus[..i].contains(c) {
                return Err(format!("poll_cpus: CPU {c} is listed twice"));
            }
        }
        if self.mac_ageing.is_zero() {
            return Err("mac_ageing: expected at least 1 second".into());
        }
        Ok(())
    }
}

/// Finds the first name or socket used twice, as an error message.
pub fn duplicate(ports: &[PortConfig]) -> Option<String> {
    for (i, p) in ports.iter().enumerate() {
        for q in &ports[..i] {
            if q.name == p.name {
                return Some(format!("port {:?} is defined twice", p.name));
            }
            if q.socket == p.socket {
                return Some(format!(
                    "port {:?}: socket {} is already used by port {:?}",
                    p.name,
                    p.socket.display(),
                    q.name
                ));
            }
        }
    }
    None
}

/// Turns command-line arguments (and the TOML file they name) into a switch config.
pub fn switch_from_args(args: &Args) -> Result<SwitchConfig, ConfigError> {
    if let Some(path) = &args.config {
        let text = keel_config_error::read(path)?;
        let mut cfg = parse_toml(&text, path)?;
        // Command-line values override the file only when given explicitly.
        if args.control.is_some() {
            cfg.control.clone_from(&args.control);
        }
        return Ok(cfg);
    }
    let cfg = SwitchConfig {
        ports: args.port.clone(),
        taps: args.tap.clone(),
        control: args.control.clone(),
        mac_ageing: Duration::from_secs(args.mac_ageing),
        queue_size: args.queue_size,
        stats_interval: Duration::from_secs(args.stats_interval),
        poll: Duration::from_micros(args.poll_us),
        poll_cpus: args.poll_cpus.clone(),
        offloads: args.offloads,
    };
    cfg.validate().map_err(ConfigError::Args)?;
    if let Some(m) = duplicate(&cfg.ports) {
        return Err(ConfigError::Args(m));
    }
    if let Some(m) = duplicate(&cfg.all_ports()) {
        return Err(ConfigError::Args(m));
    }
    if cfg.ports.is_empty() && cfg.control.is_none() {
        return Err(ConfigError::Args(
            "give --config FILE, or at least one --port (or --control to add ports later)".into(),
        ));
    }
    Ok(cfg)
}

/// Parses and validates a TOML file's text. Relative paths are relative to the file.
pub fn parse_toml(text: &str, file: &Path) -> Result<SwitchConfig, ConfigError> {
    let invalid = |offset: usize, message: String| ConfigError::at(file, text, offset, &message);
    let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::toml(file, text, &e))?;
    let base = file.parent().unwrap_or(Path::new(""));
    let mut ports: Vec<PortConfig> = Vec::new();
    for (i, spanned) in raw.port.into_iter().enumerate() {
        let start = spanned.span().start;
        let mut port = spanned.into_inner();
        port.socket = base.join(&port.socket);
        port.validate()
            .map_err(|m| invalid(start, format!("port[{i}].{m}")))?;
        ports.push(port);
        if let Some(m) = duplicate(&ports) {
            return Err(invalid(start, format!("port[{i}]: {m}")));
        }
    }
    let mut taps: Vec<TapConfig> = Vec::new();
    for (i, spanned) in raw.tap.into_iter().enumerate() {
        let start = spanned.span().start;
        let tap = spanned.into_inner();
        tap.validate()
            .map_err(|m| invalid(start, format!("tap[{i}].{m}")))?;
        taps.push(tap);
        let mut all = ports.clone();
        all.extend(taps.iter().map(TapConfig::as_port));
        if let Some(m) = duplicate(&all) {
            return Err(invalid(start, format!("tap[{i}]: {m}")));
        }
    }
    let cfg = SwitchConfig {
        ports,
        taps,
        control: raw.control.map(|c| base.join(c)),
        mac_ageing: Duration::from_secs(raw.mac_ageing),
        queue_size: raw.queue_size,
        stats_interval: Duration::from_secs(raw.stats_interval),
        poll: Duration::from_micros(raw.poll_us),
        poll_cpus: raw.poll_cpus,
        offloads: raw.offloads,
    };
    cfg.validate().map_err(|m| invalid(0, m))?;
    if cfg.ports.is_empty() && cfg.control.is_none() {
        return Err(invalid(
            0,
            "expected at least one [[port]] table or a control socket".into(),
        ));
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn parse(text: &str) -> Result<SwitchConfig, ConfigError> {
        parse_toml(text, Path::new("/etc/keel/switches/sw.toml"))
    }

    #[test]
    fn toml_ports_and_defaults() {
        let c = parse(
            "control = \"ctl.sock\"\n[[port]]\nname = \"p0\"\nsocket = \"p0.sock\"\nmac = \"52:54:00:00:00:01\"\n[[port]]\nname = \"p1\"\nsocket = \"/run/p1.sock\"\n",
        )
        .unwrap();
        assert_eq!(c.ports.len(), 2);
        assert_eq!(
            c.ports[0].socket,
            PathBuf::from("/etc/keel/switches/p0.sock")
        );
        assert_eq!(c.ports[0].mac, Some(Mac([0x52, 0x54, 0, 0, 0, 1])));
        assert_eq!(c.ports[1].mac, None);
        assert_eq!(
            c.control,
            Some(PathBuf::from("/etc/keel/switches/ctl.sock"))
        );
        assert_eq!(c.mac_ageing, Duration::from_secs(300));
        assert_eq!(c.queue_size, 256);
    }

    #[test]
    fn errors_have_line_and_column() {
        let e = parse("[[port]]\nname = \"p0\"\nsocket = \"a\"\nspeed = 3\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/etc/keel/switches/sw.toml:4:1: unknown field `speed`"),
            "{e}"
        );
        let e = parse("[[port]]\nname = \"p0\"\nsocket = \"a\"\nmac = \"52:54:00\"\n").unwrap_err();
        assert!(
            e.to_string().contains(":4:7: expected a MAC address"),
            "{e}"
        );
        let e = parse("queue_size = 100\n[[port]]\nname = \"p0\"\nsocket = \"a\"\n").unwrap_err();
        assert!(e
            .to_string()
            .contains("queue_size: expected a power of two"));
        let e = parse("[[port]]\nname = \"p0\"\nsocket = \"a\"\nmac = \"01:00:5e:00:00:01\"\n")
            .unwrap_err();
        assert!(e.to_string().contains(":1:1: port[0].mac"), "{e}");
    }

    #[test]
    fn duplicates_are_rejected() {
        let e = parse(
            "[[port]]\nname = \"p0\"\nsocket = \"a\"\n[[port]]\nname = \"p0\"\nsocket = \"b\"\n",
        )
        .unwrap_err();
        assert!(e
            .to_string()
            .contains(":4:1: port[1]: port \"p0\" is defined twice"));
        let e = parse(
            "[[port]]\nname = \"p0\"\nsocket = \"a\"\n[[port]]\nname = \"p1\"\nsocket = \"a\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("already used by port \"p0\""), "{e}");
        let e = parse("").unwrap_err();
        assert!(e.to_string().contains("at least one [[port]]"), "{e}");
    }

    #[test]
    fn command_line_ports() {
        let args = Args::try_parse_from([
            "keel-vhost-net",
            "--port",
            "name=p0,socket=/run/p0.sock,mac=52:54:00:00:00:01",
            "--port",
            "name=p1,socket=/run/p1.sock",
        ])
        .unwrap();
        let c = switch_from_args(&args).unwrap();
        assert_eq!(c.ports.len(), 2);
        assert_eq!(c.ports[1].name, "p1");
        assert!(Args::try_parse_from(["keel-vhost-net", "--port", "name=p0"]).is_err());
        assert!(
            Args::try_parse_from(["keel-vhost-net", "--port", "name=p0,socket=/s,x=1"]).is_err()
        );
        assert!(Args::try_parse_from(["keel-vhost-net", "--port", "name=a b,socket=/s"]).is_err());
        let args = Args::try_parse_from(["keel-vhost-net"]).unwrap();
        assert!(switch_from_args(&args).is_err());
        let args = Args::try_parse_from([
            "keel-vhost-net",
            "--port",
            "name=p0,socket=/s",
            "--port",
            "name=p1,socket=/s",
        ])
        .unwrap();
        assert!(switch_from_args(&args).is_err());
    }

    #[test]
    fn example_config_is_valid() {
        let c = parse_toml(
            include_str!("../examples/switch.toml"),
            Path::new("examples/switch.toml"),
        )
        .unwrap();
        assert_eq!(c.ports.len(), 2);
    }

    #[test]
    fn taps() {
        let c = parse(
            "[[port]]\nname = \"p0\"\nsocket = \"a\"\n[[tap]]\nname = \"up0\"\ndev = \"tap0\"\n",
        )
        .unwrap();
        assert_eq!(c.taps[0].dev, "tap0");
        let e =
            parse("[[port]]\nname = \"p0\"\nsocket = \"a\"\n[[tap]]\nname = \"p0\"\ndev = \"t\"\n")
                .unwrap_err();
        assert!(
            e.to_string()
                .contains(":4:1: tap[0]: port \"p0\" is defined twice"),
            "{e}"
        );
        let e = parse("[[tap]]\nname = \"u\"\ndev = \"0123456789abcdef\"\n").unwrap_err();
        assert!(e.to_string().contains("tap[0].dev"), "{e}");
        let args = Args::try_parse_from([
            "keel-vhost-net",
            "--port",
            "name=p0,socket=/s",
            "--tap",
            "name=up0,dev=tap0",
        ])
        .unwrap();
        assert_eq!(switch_from_args(&args).unwrap().taps.len(), 1);
        assert!(Args::try_parse_from(["keel-vhost-net", "--tap", "name=u,dev=a/b"]).is_err());
    }

    #[test]
    fn queues_cpus_and_rates() {
        let p: PortConfig = "name=p0,socket=/s,queues=4,cpu=2/3,rate_bps=1000000,rate_pps=500"
            .parse()
            .unwrap();
        assert_eq!(
            (p.queues, p.cpu.clone(), p.rate_bps, p.rate_pps),
            (4, vec![2, 3], 1_000_000, 500)
        );
        let p: PortConfig = "name=p0,socket=/s".parse().unwrap();
        assert_eq!((p.queues, p.cpu.len(), p.rate_pps), (1, 0, 0));
        assert!("name=p0,socket=/s,queues=0".parse::<PortConfig>().is_err());
        assert!("name=p0,socket=/s,queues=17".parse::<PortConfig>().is_err());
        assert!("name=p0,socket=/s,cpu=x".parse::<PortConfig>().is_err());
        assert!("name=p0,socket=/s,cpu=5000".parse::<PortConfig>().is_err());
        let c = parse("offloads = true\n[[port]]\nname = \"p0\"\nsocket = \"a\"\ncpu = 3\n[[port]]\nname = \"p1\"\nsocket = \"b\"\ncpu = [0, 1]\nqueues = 2\n").unwrap();
        assert!(c.offloads);
        assert_eq!(c.ports[0].cpu, vec![3]);
        assert_eq!((c.ports[1].cpu.clone(), c.ports[1].queues), (vec![0, 1], 2));
        let e = parse("[[port]]\nname = \"p0\"\nsocket = \"a\"\nqueues = 0\n").unwrap_err();
        assert!(e.to_string().contains(":1:1: port[0].queues"), "{e}");
        let args = Args::try_parse_from([
            "keel-vhost-net",
            "--port",
            "name=p0,socket=/s",
            "--offloads",
        ])
        .unwrap();
        assert!(switch_from_args(&args).unwrap().offloads);
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            "02:00:00:00:00:0a".parse::<Mac>().unwrap().to_string(),
            "02:00:00:00:00:0a"
        );
        assert!("02:00:00:00:00".parse::<Mac>().is_err());
        assert!("02:00:00:00:00:00:00".parse::<Mac>().is_err());
        assert!("02:00:00:00:00:0g".parse::<Mac>().is_err());
        assert!("ff:ff:ff:ff:ff:ff".parse::<Mac>().unwrap().is_multicast());
    }
    #[test]
    fn tap_offloads_per_uplink() {
        let t: TapConfig = "name=up0,dev=tap0".parse().unwrap();
        assert_eq!(t.offloads, None);
        let t: TapConfig = "name=up0,dev=tap0,offloads=off".parse().unwrap();
        assert_eq!(t.offloads, Some(false));
        let t: TapConfig = "name=up0,dev=tap0,offloads=on".parse().unwrap();
        assert_eq!(t.offloads, Some(true));
        let e = "name=up0,dev=tap0,offloads=maybe"
            .parse::<TapConfig>()
            .unwrap_err();
        assert!(e.contains("expected on or off"), "{e}");
        let c =
            parse("offloads = true\ncontrol = \"c\"\n[[tap]]\nname = \"up0\"\ndev = \"tap0\"\noffloads = false\n")
                .unwrap();
        assert_eq!(c.taps[0].offloads, Some(false));
        assert!(
            parse("control = \"c\"\n[[tap]]\nname = \"up0\"\ndev = \"tap0\"\noffloads = 3\n")
                .is_err()
        );
    }

    #[test]
    fn shared_poll_cpus() {
        let c =
            parse("poll_us = 50\npoll_cpus = [2, 3]\n[[port]]\nname = \"p0\"\nsocket = \"a\"\n")
                .unwrap();
        assert_eq!(c.poll_cpus, vec![2, 3]);
        let e = parse("poll_cpus = [2]\n[[port]]\nname = \"p0\"\nsocket = \"a\"\n").unwrap_err();
        assert!(e.to_string().contains("need busy-poll mode"), "{e}");
        let e = parse("poll_us = 5\npoll_cpus = [2, 2]\n[[port]]\nname = \"p0\"\nsocket = \"a\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
        let e =
            parse("poll_us = 5\npoll_cpus = [99999]\n[[port]]\nname = \"p0\"\nsocket = \"a\"\n")
                .unwrap_err();
        assert!(e.to_string().contains("not a valid CPU"), "{e}");
        let a = Args::try_parse_from([
            "keel-vhost-net",
            "--port",
            "name=p0,socket=/s",
            "--poll-us",
            "10",
            "--poll-cpus",
            "0,1",
        ])
        .unwrap();
        assert_eq!(switch_from_args(&a).unwrap().poll_cpus, vec![0, 1]);
        let a = Args::try_parse_from([
            "keel-vhost-net",
            "--port",
            "name=p0,socket=/s",
            "--poll-cpus",
            "0",
        ])
        .unwrap();
        assert!(switch_from_args(&a).is_err());
    }
}
