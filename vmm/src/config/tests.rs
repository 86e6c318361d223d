//! Whole-file tests: the operator examples must validate, every file of the bad-config
//! corpus must fail with its expected one-line message, and a full config must come out
//! with the right values and defaults.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::test_util::TempDir;
use super::*;

/// A host with CPUs 0-3 and NUMA node 0.
fn fake_host() -> HostInfo {
    HostInfo {
        online_cpus: vec![0, 1, 2, 3],
        numa_nodes: vec![0],
    }
}

/// A directory holding the files configs refer to: an ELF `vmlinux`, a `bzImage`,
/// an `initrd.img` and a `not-a-kernel.img`.
fn fake_boot_files() -> TempDir {
    let dir = TempDir::new("config");
    let mut elf = b"\x7fELF".to_vec();
    elf.resize(4096, 0);
    dir.write("vmlinux", &elf);
    let mut bzimage = vec![0u8; 4096];
    bzimage[0x202..0x206].copy_from_slice(b"HdrS");
    dir.write("bzImage", &bzimage);
    dir.write("initrd.img", b"070701");
    dir.write("not-a-kernel.img", vec![0x55u8; 4096]);
    dir
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect(),
        Err(e) => panic!("cannot list {}: {e}", dir.display()),
    };
    files.sort();
    files
}

fn read(path: &Path) -> String {
    match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => panic!("cannot read {}: {e}", path.display()),
    }
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn examples_validate() {
    let files = toml_files(&manifest_dir().join("../systemd/examples"));
    assert!(files.len() >= 6, "examples missing: {files:?}");
    let boot = fake_boot_files();
    for file in files {
        let name = file.file_name().map(PathBuf::from).unwrap_or_default();
        let origin = boot.path().join(&name);
        let result = parse_str_with_host(&read(&file), &origin, &fake_host());
        match result {
            Ok(config) => {
                assert_eq!(config.boot.kernel, boot.path().join("vmlinux"));
                let stem = name.file_stem().map(|s| s.to_string_lossy().into_owned());
                assert_eq!(Some(config.name), stem, "name should match the file name");
            }
            Err(e) => panic!("{} does not validate: {e}", file.display()),
        }
    }
}

#[test]
fn bad_corpus_fails_with_expected_messages() {
    let files = toml_files(&manifest_dir().join("tests/configs/bad"));
    assert!(files.len() >= 20, "corpus too small: {}", files.len());
    let boot = fake_boot_files();
    let origin = boot.path().join("bad.toml");
    let mut failures = Vec::new();
    for file in &files {
        let text = read(file);
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: first line must be `# expect: ...`", file.display()));
        match parse_str_with_host(&text, &origin, &fake_host()) {
            Ok(_) => failures.push(format!("{}: accepted", file.display())),
            Err(e) => {
                let message = e.to_string();
                if !message.contains(expect) || message.contains('\n') {
                    failures.push(format!(
                        "{}:\n  expected: {expect}\n  got:      {message}",
                        file.display()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

const FULL: &str = r#"
name = "full"
[vcpus]
count = 2
affinity = [[0, 1], [2]]
[memory]
size = "1G"
hugepages = "1G"
numa_node = 0
prefault = true
[vmm]
affinity = [3]
[boot]
kernel = "bzImage"
initramfs = "/abs/../initrd.img"
cmdline = "console=ttyS0"
[serial]
output = "file"
path = "logs/serial.log"
input = true
[control]
socket = "ctl.sock"
[devices]
connect_timeout = "500ms"
reply_timeout = "20s"
[[net]]
id = "net0"
socket = "/run/keel/net0.sock"
mac = "52:54:00:AB:cd:01"
queue_pairs = 2
queue_size = 1024
[[disk]]
id = "disk0"
socket = "/run/keel/disk0.sock"
read_only = true
queues = 4
queue_size = 64
serial = "SN 0001"
[[vfio]]
id = "nic0"
address = "0001:02:1f.7"
"#;

#[test]
fn full_config_values() {
    let boot = fake_boot_files();
    // An absolute initramfs path is kept as is (and must exist).
    let initrd = boot.path().join("initrd.img");
    let text = FULL.replace("/abs/../initrd.img", &initrd.display().to_string());
    let origin = boot.path().join("full.toml");
    let config = match parse_str_with_host(&text, &origin, &fake_host()) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let dir = boot.path();
    let expected = SandboxConfig {
        name: "full".into(),
        vcpus: VcpuConfig {
            count: 2,
            affinity: Some(vec![vec![0, 1], vec![2]]),
        },
        memory: MemoryConfig {
            size_bytes: 1 << 30,
            hugepages: HugePages::Size1G,
            numa_node: Some(0),
            prefault: true,
        },
        vmm: VmmConfig {
            affinity: Some(vec![3]),
        },
        boot: BootConfig {
            kernel: dir.join("bzImage"),
            initramfs: Some(initrd),
            cmdline: "console=ttyS0".into(),
        },
        serial: SerialConfig {
            output: SerialOutput::File(dir.join("logs/serial.log")),
            input: true,
        },
        control: ControlConfig {
            socket: Some(dir.join("ctl.sock")),
        },
        devices: DevicesConfig {
            connect_timeout: Duration::from_millis(500),
            reply_timeout: Duration::from_secs(20),
        },
        net: vec![NetConfig {
            id: "net0".into(),
            socket: "/run/keel/net0.sock".into(),
            mac: [0x52, 0x54, 0x00, 0xab, 0xcd, 0x01],
            queue_pairs: 2,
            queue_size: 1024,
        }],
        disk: vec![DiskConfig {
            id: "disk0".into(),
            socket: "/run/keel/disk0.sock".into(),
            read_only: true,
            queues: 4,
            queue_size: 64,
            serial: Some("SN 0001".into()),
        }],
        vfio: vec![VfioConfig {
            id: "nic0".into(),
            address: PciAddress {
                domain: 1,
                bus: 2,
                device: 0x1f,
                function: 7,
            },
        }],
    };
    assert_eq!(config, expected);
    assert_eq!(config.vfio[0].address.to_string(), "0001:02:1f.7");
}

#[test]
fn defaults() {
    let boot = fake_boot_files();
    let text = "name = \"d\"\n[memory]\nsize = 16777216\n[boot]\nkernel = \"vmlinux\"\n\
                [[net]]\nid = \"n\"\nsocket = \"n.sock\"\nmac = \"02:00:00:00:00:01\"\n\
                [[disk]]\nid = \"b\"\nsocket = \"b.sock\"\n";
    let config = match parse_str_with_host(text, &boot.path().join("d.toml"), &fake_host()) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(
        config.vcpus,
        VcpuConfig {
            count: 1,
            affinity: None
        }
    );
    assert_eq!(config.memory.size_bytes, 16 << 20);
    assert_eq!(config.memory.hugepages, HugePages::None);
    assert_eq!(config.memory.hugepages.page_size(), 4096);
    assert!(!config.memory.prefault);
    assert_eq!(config.memory.numa_node, None);
    assert_eq!(config.vmm.affinity, None);
    assert_eq!(config.boot.initramfs, None);
    assert_eq!(config.boot.cmdline, "");
    assert_eq!(
        config.serial,
        SerialConfig {
            output: SerialOutput::Stdout,
            input: false
        }
    );
    assert_eq!(config.control.socket, None);
    assert_eq!(config.devices.connect_timeout, Duration::from_secs(30));
    assert_eq!(config.devices.reply_timeout, Duration::from_secs(5));
    assert_eq!(
        (config.net[0].queue_pairs, config.net[0].queue_size),
        (1, 256)
    );
    assert_eq!(config.net[0].socket, boot.path().join("n.sock"));
    assert_eq!((config.disk[0].queues, config.disk[0].queue_size), (1, 128));
    assert!(!config.disk[0].read_only);
    assert_eq!(config.disk[0].serial, None);
}

#[test]
fn serial_off() {
    let boot = fake_boot_files();
    let text = "name = \"d\"\n[memory]\nsize = \"16MiB\"\n[boot]\nkernel = \"vmlinux\"\n\
                [serial]\noutput = \"off\"\n";
    let config = parse_str_with_host(text, &boot.path().join("d.toml"), &fake_host());
    assert_eq!(
        config.ok().map(|c| c.serial.output),
        Some(SerialOutput::Off)
    );
}

#[test]
fn relative_origin_resolves_against_its_directory() {
    let boot = fake_boot_files();
    let text = "name = \"d\"\n[memory]\nsize = \"16MiB\"\n[boot]\nkernel = \"../vmlinux\"\n";
    boot.write("sub/readme", "");
    let origin = boot.path().join("sub/d.toml");
    let config = parse_str_with_host(text, &origin, &fake_host());
    assert_eq!(
        config.ok().map(|c| c.boot.kernel),
        Some(boot.path().join("sub/../vmlinux"))
    );
}

#[test]
fn load_reports_missing_file_on_one_line() {
    let dir = TempDir::new("load");
    let path = dir.path().join("nope.toml");
    let err = load(&path).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.starts_with(&format!("{}: cannot read config file: ", path.display())),
        "{err}"
    );
    assert!(!err.contains('\n'));
}

#[test]
fn load_names_the_file_in_parse_errors() {
    let dir = TempDir::new("load-parse");
    let path = dir.write("demo.toml", "name = \"demo\"\n[memory]\nsize = \"1GiB\"\n");
    let message = load(&path).err().map(|e| e.to_string()).unwrap_or_default();
    assert_eq!(
        message,
        format!("{}:1:1: missing required field `boot`", path.display())
    );
}

#[test]
fn reads_the_real_host() {
    // Every Linux host (and container) has at least one online CPU in /sys.
    let host = HostInfo::read(Path::new("/sys"));
    assert!(host.is_ok_and(|h| !h.online_cpus.is_empty() && !h.numa_nodes.is_empty()));
}

#[test]
fn load_validates_against_the_real_host() {
    let boot = fake_boot_files();
    let path = boot.write(
        "real.toml",
        "name = \"real\"\n[memory]\nsize = \"64MiB\"\n[boot]\nkernel = \"vmlinux\"\n",
    );
    let config = load(&path);
    assert_eq!(config.ok().map(|c| c.memory.size_bytes), Some(64 << 20));
}

#[test]
fn errors_expose_position_and_field() {
    let boot = fake_boot_files();
    let text = "name = \"d\"\n[memory]\nsize = \"12 parsecs\"\n[boot]\nkernel = \"vmlinux\"\n";
    let err = parse_str_with_host(text, Path::new("demo.toml"), &fake_host()).err();
    let err = match err {
        Some(e) => e,
        None => panic!("accepted"),
    };
    assert_eq!(err.position(), Some((3, 8)));
    assert_eq!(err.field(), Some("memory.size"));
    assert_eq!(
        err.to_string(),
        "demo.toml:3:8: memory.size: expected a size like \"512MiB\" or \"2GiB\", found \"12 parsecs\""
    );
    drop(boot);
}
