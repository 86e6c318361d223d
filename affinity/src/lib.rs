//! keel-affinity: CPU affinity of the calling thread, shared by keel-vmm (vCPU and
//! VMM threads) and the backends (queue workers and poll threads).

use std::io;

/// Pins the calling thread to `cpus` (it may run on any of them). An empty list or
/// a CPU beyond the kernel's mask size is an error; so is a set of CPUs that are all
/// offline or outside the process's cpuset (the kernel refuses it).
pub fn pin_current_thread(cpus: impl IntoIterator<Item = usize>) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let max = libc::CPU_SETSIZE as usize;
    let mut any = false;
    for cpu in cpus {
        if cpu >= max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("CPU {cpu} is beyond the affinity mask size {max}"),
            ));
        }
        // SAFETY: `cpu` is below CPU_SETSIZE, so the bit lies inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        any = true;
    }
    if !any {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no CPU to pin the thread to",
        ));
    }
    // SAFETY: pid 0 means the calling thread; `set` is a valid, initialised cpu_set_t
    // of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPUs the calling thread may run on.
pub fn current_thread_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; `set` is writable and of the size passed.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `set` is initialised; CPU_ISSET only reads it.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_a_thread_changes_its_mask() {
        let result = std::thread::spawn(|| {
            let cpus = current_thread_cpus()?;
            let first = cpus.first().copied().unwrap_or(0);
            pin_current_thread([first])?;
            current_thread_cpus().map(|now| (first, now))
        })
        .join();
        match result {
            Ok(Ok((first, now))) => assert_eq!(now, vec![first]),
            other => panic!("pinning failed: {other:?}"),
        }
    }

    #[test]
    fn out_of_range_or_no_cpu_is_an_error() {
        assert!(pin_current_thread([1 << 20]).is_err());
        assert!(pin_current_thread([]).is_err());
    }
}
