//! Choosing iommufd or the legacy container/group, against a fake host tree.

use std::fs;

use super::host_checks::{Host, DEV};
use crate::vfio::preflight::{
    check_device, check_device_with, select_iommu, IommuPath, PreflightError,
};

/// Adds /dev/iommu, the device's sysfs `vfio-dev/vfio3` and `/dev/vfio/devices/vfio3`.
fn with_iommufd(host: &Host) {
    fs::write(host.path("dev/iommu"), "").unwrap();
    fs::create_dir_all(host.dev_dir(DEV).join("vfio-dev/vfio3")).unwrap();
    fs::create_dir_all(host.path("dev/vfio/devices")).unwrap();
    fs::write(host.path("dev/vfio/devices/vfio3"), "").unwrap();
}

fn reason(path: &IommuPath) -> &str {
    match path {
        IommuPath::Legacy { reason } => reason,
        IommuPath::Iommufd { cdev } => panic!("iommufd chosen ({})", cdev.display()),
    }
}

#[test]
fn iommufd_is_chosen_when_dev_iommu_and_the_cdev_exist() {
    let host = Host::new("iommufd");
    with_iommufd(&host);
    let report = check_device(&host.paths(), "nic0", DEV).unwrap();
    assert_eq!(
        report.iommu,
        IommuPath::Iommufd {
            cdev: host.path("dev/vfio/devices/vfio3")
        }
    );
    assert!(report.iommu.to_string().starts_with("iommufd"));
    // The group node is not needed on that path (CONFIG_VFIO_GROUP=n hosts).
    fs::remove_file(host.path("dev/vfio/7")).unwrap();
    assert!(check_device(&host.paths(), "nic0", DEV).is_ok());
    // Forced to legacy (another device of the VM cannot use iommufd): the group
    // node is needed again, and the error says why iommufd was not used.
    let e = check_device_with(&host.paths(), "nic0", DEV, false).unwrap_err();
    assert!(matches!(e, PreflightError::GroupNode { .. }), "{e}");
    assert!(e.to_string().contains("iommufd not used"), "{e}");
}

#[test]
fn legacy_is_chosen_with_the_reason() {
    let host = Host::new("legacy");
    let dev = host.dev_dir(DEV);
    // No /dev/iommu.
    let r = select_iommu(&host.paths(), &dev);
    assert!(reason(&r).contains("dev/iommu does not exist"), "{r}");
    assert!(reason(&r).contains("CONFIG_IOMMUFD"), "{r}");
    // /dev/iommu but no vfio-dev/ in sysfs: no cdev support in the kernel.
    fs::write(host.path("dev/iommu"), "").unwrap();
    let r = select_iommu(&host.paths(), &dev);
    assert!(reason(&r).contains("CONFIG_VFIO_DEVICE_CDEV"), "{r}");
    // Two cdev entries: ambiguous.
    fs::create_dir_all(dev.join("vfio-dev/vfio3")).unwrap();
    fs::create_dir_all(dev.join("vfio-dev/vfio4")).unwrap();
    let r = select_iommu(&host.paths(), &dev);
    assert!(reason(&r).contains("2 vfioN entries"), "{r}");
    fs::remove_dir(dev.join("vfio-dev/vfio4")).unwrap();
    // The cdev node is missing from /dev.
    let r = select_iommu(&host.paths(), &dev);
    assert!(
        reason(&r).contains("dev/vfio/devices/vfio3 does not exist"),
        "{r}"
    );
    // The legacy path still works, and the report says why it was taken.
    let report = check_device(&host.paths(), "nic0", DEV).unwrap();
    assert!(
        report.iommu.to_string().starts_with("legacy"),
        "{}",
        report.iommu
    );
    // When the group node is also missing, the error carries both stories.
    fs::remove_file(host.path("dev/vfio/7")).unwrap();
    let e = check_device(&host.paths(), "nic0", DEV)
        .unwrap_err()
        .to_string();
    assert!(e.contains("IOMMU group 7"), "{e}");
    assert!(e.contains("iommufd not used"), "{e}");
    assert!(e.contains("vfio3 does not exist"), "{e}");
}
