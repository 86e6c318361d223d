//! Boots the probe guest with the real keel-vmm binary on this host's KVM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{SandboxDir, Vmm, BOOT_TIMEOUT};

#[test]
fn probe_guest_boots_reports_and_powers_off() {
    let dir = SandboxDir::new();
    let config = dir.probe_config("hello", 2, "");
    let mut vmm = Vmm::start(&config);
    let status = vmm.wait(BOOT_TIMEOUT);
    let out = vmm.stdout.text();
    let err = vmm.stderr.text();
    assert!(
        status.success(),
        "exit {status:?}\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(out.contains("keel-probe: hello"), "{out}");
    assert!(out.contains("keel-probe: boot=linux64"), "{out}");
    assert!(
        out.contains("keel-probe: cmdline=console=ttyS0 reboot=k probe.mode=hello"),
        "{out}"
    );
    // 64 MiB minus the legacy hole below 1 MiB.
    let ram_line = out
        .lines()
        .find(|l| l.starts_with("keel-probe: ram_mib="))
        .unwrap_or_else(|| panic!("no ram line:\n{out}"));
    let ram: u64 = ram_line["keel-probe: ram_mib=".len()..]
        .trim()
        .parse()
        .unwrap();
    assert!((62..=64).contains(&ram), "{ram_line}");
    assert!(
        out.contains("keel-probe: mptable cpus=2 ioapics=1"),
        "{out}"
    );
    assert!(out.contains("hypervisor=1"), "{out}");
    assert!(out.contains("x2apic_id=0"), "{out}");
    assert!(out.contains("keel-probe: poweroff"), "{out}");
    assert!(
        err.contains("guest first instruction: monotonic_ns="),
        "{err}"
    );
    assert!(err.contains("shutting down"), "{err}");
}

#[test]
fn pvh_entry_is_used_when_the_elf_note_is_present() {
    let dir = SandboxDir::new();
    let config = dir.probe_config_with(&common::probe_elf_pvh(), "hello", 2, "");
    let mut vmm = Vmm::start(&config);
    let status = vmm.wait(BOOT_TIMEOUT);
    let out = vmm.stdout.text();
    let err = vmm.stderr.text();
    assert!(status.success(), "{out}\n{err}");
    assert!(err.contains("loaded: Pvh entry"), "{err}");
    assert!(out.contains("keel-probe: boot=pvh"), "{out}");
    assert!(
        out.contains("keel-probe: cmdline=console=ttyS0 reboot=k probe.mode=hello"),
        "{out}"
    );
    assert!(out.contains("keel-probe: ram_mib=63"), "{out}");
    assert!(
        out.contains("keel-probe: mptable cpus=2 ioapics=1"),
        "{out}"
    );
    assert!(out.contains("keel-probe: poweroff"), "{out}");
}

#[test]
fn triple_fault_exits_nonzero_naming_the_vcpu() {
    let dir = SandboxDir::new();
    let config = dir.probe_config("fault", 1, "");
    let mut vmm = Vmm::start(&config);
    let status = vmm.wait(BOOT_TIMEOUT);
    let err = vmm.stderr.text();
    assert_eq!(status.code(), Some(1), "stderr:\n{err}");
    assert!(vmm.stdout.text().contains("keel-probe: faulting"));
    assert!(err.contains("error: vCPU 0: triple fault"), "{err}");
}

#[test]
fn unhandled_port_access_does_not_stop_the_guest() {
    let dir = SandboxDir::new();
    let config = dir.probe_config("badport", 1, "");
    let mut vmm = Vmm::start(&config);
    let status = vmm.wait(BOOT_TIMEOUT);
    let out = vmm.stdout.text();
    assert!(status.success(), "{out}\n{}", vmm.stderr.text());
    assert!(out.contains("keel-probe: badport read=0xff"), "{out}");
    assert!(out.contains("keel-probe: poweroff"), "{out}");
}

#[test]
fn serial_input_from_stdin_reaches_the_guest() {
    use std::io::Write;
    let dir = SandboxDir::new();
    let config = dir.probe_config("echo", 1, "[serial]\noutput = \"stdout\"\ninput = true\n");
    let mut vmm = Vmm::start(&config);
    vmm.stdout.wait_for("keel-probe: echo ready", BOOT_TIMEOUT);
    let mut stdin = vmm.stdin.take().unwrap();
    // Longer than the 16550's 64-byte FIFO: needs the back-pressure path.
    let long = "x".repeat(150);
    writeln!(stdin, "hello keel").unwrap();
    writeln!(stdin, "{long}").unwrap();
    stdin.flush().unwrap();
    vmm.stdout
        .wait_for("keel-probe: echo: hello keel", Duration::from_secs(30));
    vmm.stdout.wait_for(
        &format!("keel-probe: echo: {long}"),
        Duration::from_secs(30),
    );
    writeln!(stdin, "poweroff").unwrap();
    stdin.flush().unwrap();
    let status = vmm.wait(BOOT_TIMEOUT);
    assert!(status.success(), "{}", vmm.stderr.text());
}

#[test]
fn serial_output_to_a_file() {
    let dir = SandboxDir::new();
    let log = dir.path("serial.log");
    let extra = format!(
        "[serial]\noutput = \"file\"\npath = \"{}\"\n",
        log.display()
    );
    let config = dir.probe_config("hello", 1, &extra);
    let mut vmm = Vmm::start(&config);
    let status = vmm.wait(BOOT_TIMEOUT);
    assert!(status.success(), "{}", vmm.stderr.text());
    assert!(!vmm.stdout.text().contains("keel-probe"));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("keel-probe: hello"), "{text}");
    assert!(text.contains("keel-probe: poweroff"), "{text}");
}

#[test]
fn hugepage_shortage_is_reported_with_numbers() {
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
    // Ask for more 2 MiB pages than are free.
    // More than the whole pool (other tests may use part of it concurrently).
    let mib = (free + 4096) * 2;
    let dir = SandboxDir::new();
    let body = format!(
        "name = \"huge\"\n[memory]\nsize = \"{mib}MiB\"\nhugepages = \"2M\"\n[boot]\nkernel = \"{}\"\n",
        common::probe_elf().display()
    );
    let config = dir.config(&body);
    let mut vmm = Vmm::start(&config);
    let status = vmm.wait(BOOT_TIMEOUT);
    let err = vmm.stderr.text();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("need {}", mib / 2)), "{err}");
    let free_now = err
        .split("free ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(free_now.is_some_and(|f| f <= free), "{err}");
    assert!(err.contains("nr_hugepages"), "{err}");
}

#[test]
fn numa_bound_prefaulted_memory_boots() {
    let dir = SandboxDir::new();
    let config = dir.probe_config(
        "hello",
        1,
        "[memory]\nsize = \"64MiB\"\nnuma_node = 0\nprefault = true\n",
    );
    let mut vmm = Vmm::start(&config);
    let status = vmm.wait(BOOT_TIMEOUT);
    let err = vmm.stderr.text();
    assert!(status.success(), "{err}");
    assert!(err.contains("bound to NUMA node 0, prefaulted"), "{err}");
    assert!(vmm.stdout.text().contains("keel-probe: ram_mib=63"));
}

#[test]
fn hugepage_backed_memory_boots_when_the_pool_allows() {
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
    if free < 32 {
        eprintln!("skipping: only {free} free 2 MiB hugepages (scripts/setup.sh reserves 512)");
        return;
    }
    let dir = SandboxDir::new();
    let config = dir.probe_config(
        "hello",
        1,
        "[memory]\nsize = \"64MiB\"\nhugepages = \"2M\"\nprefault = true\n",
    );
    let mut vmm = Vmm::start(&config);
    let status = vmm.wait(BOOT_TIMEOUT);
    let err = vmm.stderr.text();
    assert!(status.success(), "{err}");
    assert!(err.contains("2 MiB hugepages"), "{err}");
    assert!(vmm.stdout.text().contains("keel-probe: ram_mib=63"));
}
