//! Pre-flight checks against a fake sysfs tree and /dev/vfio.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;

use crate::vfio::preflight::{
    cap_ipc_lock_in, check_device, check_memlock, numa_mismatch, HostPaths, Memlock,
    PreflightError, MEMLOCK_MARGIN,
};

pub(super) const DEV: &str = "0000:01:00.0";
const SIBLING: &str = "0000:01:00.1";

/// A throw-away host tree: sys/ and dev/vfio/.
pub(super) struct Host {
    root: PathBuf,
}

impl Host {
    pub(super) fn new(name: &str) -> Self {
        let root = std::env::temp_dir().join(format!(
            "keel-vfio-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&root);
        for d in [
            "sys/bus/pci/drivers/vfio-pci",
            "sys/bus/pci/drivers/igb",
            "sys/bus/pci/drivers/pcieport",
            "sys/kernel/iommu_groups/7/devices",
            "dev/vfio",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("dev/vfio/vfio"), "").unwrap();
        fs::write(root.join("dev/vfio/7"), "").unwrap();
        let host = Self { root };
        host.add_device(DEV, Some("vfio-pci"), 0);
        host
    }

    pub(super) fn paths(&self) -> HostPaths {
        HostPaths {
            sysfs: self.root.join("sys"),
            dev_vfio: self.root.join("dev/vfio"),
            dev_iommu: self.root.join("dev/iommu"),
        }
    }

    pub(super) fn dev_dir(&self, addr: &str) -> PathBuf {
        self.root.join("sys/devices/pci0000:00").join(addr)
    }

    /// A device in group 7, with `driver` and header type `header`.
    fn add_device(&self, addr: &str, driver: Option<&str>, header: u8) {
        let dir = self.dev_dir(addr);
        fs::create_dir_all(&dir).unwrap();
        let mut config = vec![0u8; 64];
        config[0x0e] = header;
        fs::write(dir.join("config"), config).unwrap();
        fs::write(dir.join("numa_node"), "1\n").unwrap();
        symlink(
            self.root.join("sys/kernel/iommu_groups/7"),
            dir.join("iommu_group"),
        )
        .unwrap();
        symlink(&dir, self.root.join("sys/bus/pci/devices").join(addr)).unwrap_or_else(|_| {
            fs::create_dir_all(self.root.join("sys/bus/pci/devices")).unwrap();
            symlink(&dir, self.root.join("sys/bus/pci/devices").join(addr)).unwrap();
        });
        symlink(
            &dir,
            self.root
                .join("sys/kernel/iommu_groups/7/devices")
                .join(addr),
        )
        .unwrap();
        if let Some(d) = driver {
            self.bind(addr, d);
        }
    }

    fn bind(&self, addr: &str, driver: &str) {
        let link = self.dev_dir(addr).join("driver");
        let _ = fs::remove_file(&link);
        symlink(self.root.join("sys/bus/pci/drivers").join(driver), link).unwrap();
    }

    fn unbind(&self, addr: &str) {
        fs::remove_file(self.dev_dir(addr).join("driver")).unwrap();
    }

    pub(super) fn path(&self, p: &str) -> PathBuf {
        self.root.join(p)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn check(host: &Host) -> Result<crate::vfio::preflight::DeviceReport, PreflightError> {
    check_device(&host.paths(), "nic0", DEV)
}

fn message(host: &Host) -> String {
    check(host).unwrap_err().to_string()
}

#[test]
fn a_ready_device_reports_its_group_and_numa_node() {
    let host = Host::new("ready");
    let report = check(&host).unwrap();
    assert_eq!(report.group, 7);
    assert_eq!(report.numa_node, Some(1));
    assert!(report.sysfs_path.ends_with(DEV));
    // numa_node -1 means unknown.
    fs::write(host.dev_dir(DEV).join("numa_node"), "-1\n").unwrap();
    assert_eq!(check(&host).unwrap().numa_node, None);
}

#[test]
fn missing_dev_vfio_names_the_device_and_the_fix() {
    let host = Host::new("novfio");
    fs::remove_dir_all(host.path("dev/vfio")).unwrap();
    let e = check(&host).unwrap_err();
    assert!(matches!(e, PreflightError::NoVfio { .. }));
    let m = e.to_string();
    assert!(m.contains("vfio nic0 (0000:01:00.0)"), "{m}");
    assert!(
        m.contains(&host.path("dev/vfio").display().to_string()),
        "{m}"
    );
    assert!(m.contains("does not exist"), "{m}");
    assert!(m.contains("modprobe vfio-pci"), "{m}");
}

#[test]
fn missing_device() {
    let host = Host::new("nodev");
    let m = check_device(&host.paths(), "nvme0", "0000:42:00.0")
        .unwrap_err()
        .to_string();
    assert!(
        m.contains("vfio nvme0 (0000:42:00.0): no such PCI device"),
        "{m}"
    );
    assert!(m.contains("lspci -D"), "{m}");
}

#[test]
fn unbound_or_host_bound_device_gets_the_bind_commands() {
    let host = Host::new("unbound");
    host.unbind(DEV);
    let m = message(&host);
    assert!(
        m.contains("not bound to any driver, not to vfio-pci"),
        "{m}"
    );
    assert!(
        m.contains("echo vfio-pci > /sys/bus/pci/devices/0000:01:00.0/driver_override"),
        "{m}"
    );
    assert!(
        m.contains("echo 0000:01:00.0 > /sys/bus/pci/drivers/vfio-pci/bind"),
        "{m}"
    );
    assert!(!m.contains("unbind"), "{m}");
    host.bind(DEV, "igb");
    let m = message(&host);
    assert!(m.contains("bound to driver igb, not to vfio-pci"), "{m}");
    assert!(
        m.contains("echo 0000:01:00.0 > /sys/bus/pci/devices/0000:01:00.0/driver/unbind"),
        "{m}"
    );
}

#[test]
fn no_iommu_group_means_the_iommu_is_off() {
    let host = Host::new("noiommu");
    fs::remove_file(host.dev_dir(DEV).join("iommu_group")).unwrap();
    let m = message(&host);
    assert!(
        m.contains("iommu_group does not exist: the IOMMU is off"),
        "{m}"
    );
    assert!(m.contains("intel_iommu=on"), "{m}");
}

#[test]
fn group_viability_follows_the_kernel_rule() {
    let host = Host::new("group");
    // The NIC's second port still on igb: not viable.
    host.add_device(SIBLING, Some("igb"), 0);
    let e = check(&host).unwrap_err();
    let m = e.to_string();
    assert!(
        matches!(&e, PreflightError::GroupNotViable { group: 7, others, .. }
            if others == &vec![(SIBLING.to_owned(), "igb".to_owned())]),
        "{m}"
    );
    assert!(
        m.contains("IOMMU group 7 also holds 0000:01:00.1 (bound to driver igb)"),
        "{m}"
    );
    // No driver, vfio-pci, pci-stub, pcieport: viable.
    host.unbind(SIBLING);
    assert!(check(&host).is_ok());
    for ok in ["vfio-pci", "pcieport"] {
        host.bind(SIBLING, ok);
        assert!(check(&host).is_ok(), "{ok}");
    }
    // A bridge (header type 1) with any driver: viable.
    host.add_device("0000:00:1c.0", Some("igb"), 0x81);
    assert!(check(&host).is_ok());
    // An endpoint with another driver: not.
    host.add_device("0000:01:00.2", Some("igb"), 0x80);
    assert!(message(&host).contains("0000:01:00.2"));
}

#[test]
fn missing_group_node() {
    let host = Host::new("nonode");
    fs::remove_file(host.path("dev/vfio/7")).unwrap();
    let m = message(&host);
    assert!(m.contains("IOMMU group 7"), "{m}");
    assert!(m.contains("dev/vfio/7 does not exist"), "{m}");
}

#[test]
fn memlock_limit_must_cover_guest_ram() {
    let ram = 2u64 << 30;
    let low = Memlock {
        limit: Some(8 << 20),
        cap_ipc_lock: false,
    };
    let e = check_memlock(low, ram).unwrap_err();
    let needed = ram + MEMLOCK_MARGIN;
    let m = e.to_string();
    assert!(m.contains("is 8388608 bytes (8192 KiB)"), "{m}");
    assert!(m.contains(&format!("but {needed} bytes (2112 MiB")), "{m}");
    assert!(m.contains("ulimit -l 2162688"), "{m}");
    assert!(m.contains(&format!("LimitMEMLOCK={needed}")), "{m}");
    assert!(check_memlock(
        Memlock {
            limit: Some(needed),
            cap_ipc_lock: false
        },
        ram
    )
    .is_ok());
    assert!(check_memlock(
        Memlock {
            limit: None,
            cap_ipc_lock: false
        },
        ram
    )
    .is_ok());
    assert!(check_memlock(
        Memlock {
            limit: Some(0),
            cap_ipc_lock: true
        },
        ram
    )
    .is_ok());
}

#[test]
fn cap_ipc_lock_is_read_from_capeff() {
    assert!(cap_ipc_lock_in("Name:\tx\nCapEff:\t000001fffeffffff\n"));
    assert!(!cap_ipc_lock_in("CapEff:\t0000000000000000\n"));
    assert!(!cap_ipc_lock_in("CapPrm:\t0000000000004000\n"));
    assert!(cap_ipc_lock_in("CapEff:\t0000000000004000\n"));
}

#[test]
fn numa_mismatch_warns_with_the_fix() {
    assert_eq!(numa_mismatch("nic0", Some(1), Some(1)), None);
    assert_eq!(numa_mismatch("nic0", None, Some(0)), None);
    assert_eq!(numa_mismatch("nic0", Some(1), None), None);
    let w = numa_mismatch("nic0", Some(1), Some(0)).unwrap();
    assert!(
        w.contains("NUMA node 1") && w.contains("numa_node = 1"),
        "{w}"
    );
}
