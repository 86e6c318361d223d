//! Raw structs to validated [`SandboxConfig`]: ranges, formats, cross-field rules and
//! checks against the host and the file system.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::addr::{format_mac, parse_mac, PciAddress, MAC_EXPECTED, PCI_EXPECTED};
use super::error::Problem;
use super::host::{format_cpu_list, HostInfo};
use super::model::*;
use super::raw::*;
use super::size::{format_size, parse_duration, parse_size, DURATION_EXPECTED, MIB, SIZE_EXPECTED};

/// Smallest guest memory accepted.
pub const MIN_MEMORY: u64 = 16 * MIB;
/// Largest vCPU count.
pub const MAX_VCPUS: i64 = 254;
/// Longest kernel command line in bytes (the boot protocol limit is 2048 with the NUL).
pub const MAX_CMDLINE: usize = 2047;
/// Largest virtqueue size.
pub const MAX_QUEUE_SIZE: i64 = 32768;
/// Largest number of net queue pairs or disk queues.
pub const MAX_QUEUES: i64 = 64;
/// Longest Unix socket path in bytes (`sun_path` is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// Longest disk serial in bytes (virtio-blk ID string).
pub const MAX_DISK_SERIAL: usize = 20;
/// Default vhost-user connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `[devices] reply_timeout`.
pub const DEFAULT_REPLY_TIMEOUT: Duration = keel_devices::vhost_user::connection::REPLY_TIMEOUT;

type Result<T> = std::result::Result<T, Problem>;

/// Validates `raw`; relative paths are resolved against `base_dir`.
pub(crate) fn validate(raw: RawConfig, base_dir: &Path, host: &HostInfo) -> Result<SandboxConfig> {
    let name = check_name(&raw.name, "name")?;
    let vcpus = vcpus(&raw.vcpus, host)?;
    let memory = memory(&raw.memory, host)?;
    let vmm = VmmConfig {
        affinity: match &raw.vmm.affinity {
            Some(list) => Some(cpu_list(list, "vmm.affinity", host)?),
            None => None,
        },
    };
    let boot = boot(&raw.boot, base_dir)?;
    let serial = serial(&raw.serial, base_dir)?;
    let control = ControlConfig {
        socket: match &raw.control.socket {
            Some(s) => Some(socket_path(s, "control.socket", base_dir)?),
            None => None,
        },
    };
    let devices = DevicesConfig {
        connect_timeout: match &raw.devices.connect_timeout {
            Some(t) => duration(t, "devices.connect_timeout")?,
            None => DEFAULT_CONNECT_TIMEOUT,
        },
        reply_timeout: match &raw.devices.reply_timeout {
            Some(t) => duration(t, "devices.reply_timeout")?,
            None => DEFAULT_REPLY_TIMEOUT,
        },
    };

    let mut unique = Uniqueness::default();
    if let (Some(raw_socket), Some(socket)) = (&raw.control.socket, &control.socket) {
        unique.socket(socket, raw_socket, "control.socket")?;
    }
    let mut net = Vec::with_capacity(raw.net.len());
    for (i, raw_net) in raw.net.iter().enumerate() {
        let dev = net_device(raw_net, &format!("net[{i}]"), base_dir)?;
        unique.id(&dev.id, &raw_net.id, &format!("net[{i}].id"))?;
        unique.socket(&dev.socket, &raw_net.socket, &format!("net[{i}].socket"))?;
        unique.mac(&dev.mac, &raw_net.mac, &format!("net[{i}].mac"))?;
        net.push(dev);
    }
    let mut disk = Vec::with_capacity(raw.disk.len());
    for (i, raw_disk) in raw.disk.iter().enumerate() {
        let dev = disk_device(raw_disk, &format!("disk[{i}]"), base_dir)?;
        unique.id(&dev.id, &raw_disk.id, &format!("disk[{i}].id"))?;
        unique.socket(&dev.socket, &raw_disk.socket, &format!("disk[{i}].socket"))?;
        disk.push(dev);
    }
    let mut vfio = Vec::with_capacity(raw.vfio.len());
    for (i, raw_vfio) in raw.vfio.iter().enumerate() {
        let dev = vfio_device(raw_vfio, &format!("vfio[{i}]"))?;
        unique.id(&dev.id, &raw_vfio.id, &format!("vfio[{i}].id"))?;
        unique.pci(
            &dev.address,
            &raw_vfio.address,
            &format!("vfio[{i}].address"),
        )?;
        vfio.push(dev);
    }

    Ok(SandboxConfig {
        name,
        vcpus,
        memory,
        vmm,
        boot,
        serial,
        control,
        devices,
        net,
        disk,
        vfio,
    })
}

fn vcpus(raw: &RawVcpus, host: &HostInfo) -> Result<VcpuConfig> {
    let count = match &raw.count {
        Some(c) => int_in_range(c, "vcpus.count", 1, MAX_VCPUS, "a vCPU count")? as u8,
        None => 1,
    };
    let affinity = match &raw.affinity {
        None => None,
        Some(lists) => {
            if lists.get_ref().len() != usize::from(count) {
                return Err(Problem::new(
                    lists.span(),
                    "vcpus.affinity",
                    format!(
                        "expected one CPU list per vCPU ({count} because vcpus.count = {count}), \
                         found {} list{}",
                        lists.get_ref().len(),
                        if lists.get_ref().len() == 1 { "" } else { "s" }
                    ),
                ));
            }
            let mut out = Vec::with_capacity(lists.get_ref().len());
            for (i, list) in lists.get_ref().iter().enumerate() {
                out.push(cpu_list(list, &format!("vcpus.affinity[{i}]"), host)?);
            }
            Some(out)
        }
    };
    Ok(VcpuConfig { count, affinity })
}

fn memory(raw: &RawMemory, host: &HostInfo) -> Result<MemoryConfig> {
    let hugepages = match &raw.hugepages {
        None => HugePages::None,
        Some(h) => match h.get_ref().as_str() {
            "none" => HugePages::None,
            "2M" => HugePages::Size2M,
            "1G" => HugePages::Size1G,
            other => {
                return Err(Problem::new(
                    h.span(),
                    "memory.hugepages",
                    format!("expected \"none\", \"2M\" or \"1G\", found {other:?}"),
                ))
            }
        },
    };
    let size_bytes = size(&raw.size, "memory.size")?;
    let problem = |message: String| Problem::new(raw.size.span(), "memory.size", message);
    if size_bytes < MIN_MEMORY {
        return Err(problem(format!(
            "expected at least 16MiB, found {}",
            format_size(size_bytes)
        )));
    }
    let page = hugepages.page_size();
    if size_bytes % page != 0 {
        let down = size_bytes / page * page;
        let up = down.saturating_add(page);
        let what = match hugepages {
            HugePages::None => "4KiB (the page size)".to_string(),
            other => format!(
                "the {} huge page size (hugepages = {:?})",
                other.as_str(),
                other.as_str()
            ),
        };
        return Err(problem(format!(
            "expected a multiple of {what}, found {} (try {} or {})",
            format_size(size_bytes),
            format_size(down),
            format_size(up)
        )));
    }
    let numa_node = match &raw.numa_node {
        None => None,
        Some(n) => {
            let node =
                int_in_range(n, "memory.numa_node", 0, i64::from(u32::MAX), "a NUMA node")? as u32;
            if !host.has_numa_node(node) {
                return Err(Problem::new(
                    n.span(),
                    "memory.numa_node",
                    format!(
                        "expected a NUMA node of this host ({}), found {node}",
                        format_cpu_list(&host.numa_nodes)
                    ),
                ));
            }
            Some(node)
        }
    };
    Ok(MemoryConfig {
        size_bytes,
        hugepages,
        numa_node,
        prefault: raw.prefault,
    })
}

fn boot(raw: &RawBoot, base_dir: &Path) -> Result<BootConfig> {
    let kernel = existing_file(&raw.kernel, "boot.kernel", base_dir)?;
    check_kernel_format(&kernel, &raw.kernel)?;
    let initramfs = match &raw.initramfs {
        Some(i) => Some(existing_file(i, "boot.initramfs", base_dir)?),
        None => None,
    };
    let cmdline = match &raw.cmdline {
        None => String::new(),
        Some(c) => {
            let text = c.get_ref();
            let problem = |m: String| Problem::new(c.span(), "boot.cmdline", m);
            if text.len() > MAX_CMDLINE {
                return Err(problem(format!(
                    "expected at most {MAX_CMDLINE} bytes, found {} bytes",
                    text.len()
                )));
            }
            if text.contains('\0') {
                return Err(problem("expected no NUL characters, found one".into()));
            }
            text.clone()
        }
    };
    Ok(BootConfig {
        kernel,
        initramfs,
        cmdline,
    })
}

/// Accepts an ELF image (`\x7fELF` at 0) or a bzImage (`HdrS` at 0x202).
fn check_kernel_format(path: &Path, raw: &Spanned<String>) -> Result<()> {
    let problem = |m: String| Problem::new(raw.span(), "boot.kernel", m);
    let mut head = Vec::with_capacity(0x206);
    File::open(path)
        .and_then(|f| f.take(0x206).read_to_end(&mut head))
        .map_err(|e| problem(format!("cannot read {}: {e}", path.display())))?;
    let is_elf = head.starts_with(b"\x7fELF");
    let is_bzimage = head.get(0x202..0x206) == Some(b"HdrS".as_slice());
    if is_elf || is_bzimage {
        Ok(())
    } else {
        Err(problem(format!(
            "expected an ELF vmlinux or a bzImage, found neither ELF magic nor \"HdrS\" at \
             offset 0x202 in {}",
            path.display()
        )))
    }
}

fn serial(raw: &RawSerial, base_dir: &Path) -> Result<SerialConfig> {
    let output_name = raw.output.as_ref().map(|o| o.get_ref().as_str());
    let output = match (output_name, &raw.path) {
        (None | Some("stdout"), None) => SerialOutput::Stdout,
        (Some("off"), None) => SerialOutput::Off,
        (Some("file"), Some(path)) => SerialOutput::File(resolve(path, "serial.path", base_dir)?),
        (Some("file"), None) => {
            let span = raw.output.as_ref().map(|o| o.span()).unwrap_or(0..0);
            return Err(Problem::new(
                span,
                "serial.path",
                "expected a path because output = \"file\", found none",
            ));
        }
        (None | Some("stdout") | Some("off"), Some(path)) => {
            return Err(Problem::new(
                path.span(),
                "serial.path",
                format!(
                    "only allowed with output = \"file\", found output = {:?}",
                    output_name.unwrap_or("stdout")
                ),
            ));
        }
        (Some(other), _) => {
            let span = raw.output.as_ref().map(|o| o.span()).unwrap_or(0..0);
            return Err(Problem::new(
                span,
                "serial.output",
                format!("expected \"stdout\", \"file\" or \"off\", found {other:?}"),
            ));
        }
    };
    Ok(SerialConfig {
        output,
        input: raw.input,
    })
}

fn net_device(raw: &RawNet, field: &str, base_dir: &Path) -> Result<NetConfig> {
    let id = check_name(&raw.id, &format!("{field}.id"))?;
    let socket = socket_path(&raw.socket, &format!("{field}.socket"), base_dir)?;
    let mac_field = format!("{field}.mac");
    let mac = parse_mac(raw.mac.get_ref()).ok_or_else(|| {
        Problem::new(
            raw.mac.span(),
            &mac_field,
            format!("expected {MAC_EXPECTED}, found {:?}", raw.mac.get_ref()),
        )
    })?;
    if mac[0] & 1 != 0 {
        return Err(Problem::new(
            raw.mac.span(),
            &mac_field,
            format!(
                "expected a unicast MAC (lowest bit of the first byte clear), found multicast {}",
                format_mac(&mac)
            ),
        ));
    }
    if mac == [0; 6] {
        return Err(Problem::new(
            raw.mac.span(),
            &mac_field,
            "expected a non-zero MAC, found 00:00:00:00:00:00",
        ));
    }
    let queue_pairs = match &raw.queue_pairs {
        Some(q) => int_in_range(
            q,
            &format!("{field}.queue_pairs"),
            1,
            MAX_QUEUES,
            "a queue pair count",
        )? as u16,
        None => 1,
    };
    let queue_size = match &raw.queue_size {
        Some(q) => queue_size(q, &format!("{field}.queue_size"))?,
        None => 256,
    };
    Ok(NetConfig {
        id,
        socket,
        mac,
        queue_pairs,
        queue_size,
    })
}

fn disk_device(raw: &RawDisk, field: &str, base_dir: &Path) -> Result<DiskConfig> {
    let id = check_name(&raw.id, &format!("{field}.id"))?;
    let socket = socket_path(&raw.socket, &format!("{field}.socket"), base_dir)?;
    let queues = match &raw.queues {
        Some(q) => int_in_range(
            q,
            &format!("{field}.queues"),
            1,
            MAX_QUEUES,
            "a queue count",
        )? as u16,
        None => 1,
    };
    let queue_size = match &raw.queue_size {
        Some(q) => queue_size(q, &format!("{field}.queue_size"))?,
        None => 128,
    };
    let serial = match &raw.serial {
        None => None,
        Some(s) => {
            let text = s.get_ref();
            if text.len() > MAX_DISK_SERIAL
                || !text.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
            {
                return Err(Problem::new(
                    s.span(),
                    format!("{field}.serial"),
                    format!(
                        "expected at most {MAX_DISK_SERIAL} printable ASCII characters, found \
                         {text:?} ({} bytes)",
                        text.len()
                    ),
                ));
            }
            Some(text.clone())
        }
    };
    Ok(DiskConfig {
        id,
        socket,
        read_only: raw.read_only,
        queues,
        queue_size,
        serial,
    })
}

fn vfio_device(raw: &RawVfio, field: &str) -> Result<VfioConfig> {
    let id = check_name(&raw.id, &format!("{field}.id"))?;
    let address = PciAddress::parse(raw.address.get_ref()).ok_or_else(|| {
        Problem::new(
            raw.address.span(),
            format!("{field}.address"),
            format!("expected {PCI_EXPECTED}, found {:?}", raw.address.get_ref()),
        )
    })?;
    Ok(VfioConfig { id, address })
}

/// Remembers ids, sockets, MACs and PCI addresses already used, and where.
#[derive(Default)]
struct Uniqueness {
    ids: HashMap<String, String>,
    sockets: HashMap<PathBuf, String>,
    macs: HashMap<[u8; 6], String>,
    pci: HashMap<PciAddress, String>,
}

impl Uniqueness {
    fn id(&mut self, id: &str, raw: &Spanned<String>, field: &str) -> Result<()> {
        check_unique(
            &mut self.ids,
            id.to_string(),
            raw,
            field,
            "id",
            format!("{id:?}"),
        )
    }

    fn socket(&mut self, socket: &Path, raw: &Spanned<String>, field: &str) -> Result<()> {
        let shown = format!("{:?}", socket.display().to_string());
        check_unique(
            &mut self.sockets,
            socket.to_path_buf(),
            raw,
            field,
            "socket",
            shown,
        )
    }

    fn mac(&mut self, mac: &[u8; 6], raw: &Spanned<String>, field: &str) -> Result<()> {
        check_unique(&mut self.macs, *mac, raw, field, "MAC", format_mac(mac))
    }

    fn pci(&mut self, address: &PciAddress, raw: &Spanned<String>, field: &str) -> Result<()> {
        check_unique(
            &mut self.pci,
            *address,
            raw,
            field,
            "PCI address",
            address.to_string(),
        )
    }
}

fn check_unique<K: std::hash::Hash + Eq>(
    seen: &mut HashMap<K, String>,
    key: K,
    raw: &Spanned<String>,
    field: &str,
    what: &str,
    shown: String,
) -> Result<()> {
    if let Some(first) = seen.get(&key) {
        return Err(Problem::new(
            raw.span(),
            field,
            format!("expected a unique {what}, found duplicate {what} {shown} (already used by {first})"),
        ));
    }
    seen.insert(key, field.to_string());
    Ok(())
}

/// Names and ids: 1..=64 of `[A-Za-z0-9_.-]`, not starting with `.`.
fn check_name(raw: &Spanned<String>, field: &str) -> Result<String> {
    let text = raw.get_ref();
    let ok = (1..=64).contains(&text.len())
        && !text.starts_with('.')
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(text.clone())
    } else {
        Err(Problem::new(
            raw.span(),
            field,
            format!(
                "expected 1 to 64 characters from A-Z a-z 0-9 _ . - (not starting with \".\"), \
                 found {text:?}"
            ),
        ))
    }
}

fn int_in_range(raw: &Spanned<i64>, field: &str, min: i64, max: i64, what: &str) -> Result<i64> {
    let value = *raw.get_ref();
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(Problem::new(
            raw.span(),
            field,
            format!("expected {what} from {min} to {max}, found {value}"),
        ))
    }
}

fn queue_size(raw: &Spanned<i64>, field: &str) -> Result<u16> {
    let value = *raw.get_ref();
    if (1..=MAX_QUEUE_SIZE).contains(&value) && (value as u64).is_power_of_two() {
        Ok(value as u16)
    } else {
        Err(Problem::new(
            raw.span(),
            field,
            format!("expected a power of two from 1 to {MAX_QUEUE_SIZE}, found {value}"),
        ))
    }
}

/// A non-empty list of online host CPUs.
fn cpu_list(raw: &RawCpuList, field: &str, host: &HostInfo) -> Result<Vec<u32>> {
    if raw.get_ref().is_empty() {
        return Err(Problem::new(
            raw.span(),
            field,
            "expected at least one host CPU, found an empty list",
        ));
    }
    let mut cpus = Vec::with_capacity(raw.get_ref().len());
    for (i, cpu) in raw.get_ref().iter().enumerate() {
        let value = *cpu.get_ref();
        let online = u32::try_from(value).ok().filter(|c| host.has_cpu(*c));
        match online {
            Some(c) => cpus.push(c),
            None => {
                return Err(Problem::new(
                    cpu.span(),
                    format!("{field}[{i}]"),
                    format!(
                        "expected an online host CPU ({}), found {value}",
                        format_cpu_list(&host.online_cpus)
                    ),
                ))
            }
        }
    }
    Ok(cpus)
}

fn size(raw: &Spanned<toml::Value>, field: &str) -> Result<u64> {
    let found = match raw.get_ref() {
        toml::Value::String(s) => match parse_size(s) {
            Some(bytes) => return Ok(bytes),
            None => format!("{s:?}"),
        },
        toml::Value::Integer(i) => match u64::try_from(*i) {
            Ok(bytes) => return Ok(bytes),
            Err(_) => format!("{i}"),
        },
        other => format!("{} {other}", other.type_str()),
    };
    Err(Problem::new(
        raw.span(),
        field,
        format!("expected {SIZE_EXPECTED}, found {found}"),
    ))
}

fn duration(raw: &Spanned<String>, field: &str) -> Result<Duration> {
    match parse_duration(raw.get_ref()) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(Problem::new(
            raw.span(),
            field,
            format!(
                "expected {DURATION_EXPECTED} (more than zero), found {:?}",
                raw.get_ref()
            ),
        )),
    }
}

/// A non-empty path without NUL, resolved against `base_dir`.
fn resolve(raw: &Spanned<String>, field: &str, base_dir: &Path) -> Result<PathBuf> {
    let text = raw.get_ref();
    if text.is_empty() || text.contains('\0') {
        return Err(Problem::new(
            raw.span(),
            field,
            format!("expected a file path, found {text:?}"),
        ));
    }
    Ok(base_dir.join(text))
}

fn existing_file(raw: &Spanned<String>, field: &str, base_dir: &Path) -> Result<PathBuf> {
    let path = resolve(raw, field, base_dir)?;
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_file() => Ok(path),
        Ok(_) => Err(Problem::new(
            raw.span(),
            field,
            format!(
                "expected a regular file, found a directory or device at {}",
                path.display()
            ),
        )),
        Err(e) => Err(Problem::new(
            raw.span(),
            field,
            format!(
                "expected an existing file at {}, found: {e}",
                path.display()
            ),
        )),
    }
}

fn socket_path(raw: &Spanned<String>, field: &str, base_dir: &Path) -> Result<PathBuf> {
    let path = resolve(raw, field, base_dir)?;
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Problem::new(
            raw.span(),
            field,
            format!(
                "expected a Unix socket path of at most {MAX_SOCKET_PATH} bytes, found {len} \
                 bytes ({})",
                path.display()
            ),
        ));
    }
    Ok(path)
}
