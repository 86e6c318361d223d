//! Tests of the VFIO layers above the ioctls, against a fake device built from
//! synthetic configuration-space fixtures (see `testdata/`).

mod config_space;
mod dma_map;
mod fake;
mod function;
mod host_checks;
mod iommu_select;
mod masking;
