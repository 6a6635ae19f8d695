use super::*;

#[test]
fn every_class_compiles_in_both_modes() {
    for class in ThreadClass::ALL {
        for mismatch in [SeccompAction::KillProcess, SeccompAction::Log] {
            let program = compile(class, mismatch).unwrap();
            assert!(!program.is_empty(), "{}", class.name());
        }
    }
}

#[test]
fn the_vmm_filter_holds_every_class_it_spawns() {
    // A spawned thread starts under the VMM thread's filter and can only narrow it: whatever
    // its class allows, the VMM's must allow too, with the same or wider arguments.
    let vmm = ThreadClass::Vmm.merged();
    for class in [ThreadClass::Api, ThreadClass::Vcpu, ThreadClass::EventLoop, ThreadClass::Dma] {
        for (nr, rules) in class.merged() {
            let wider = match (vmm.get(&nr), rules) {
                (None, _) => false,
                (Some(None), _) => true,
                (Some(Some(_)), None) => false,
                (Some(Some(vmm_rules)), Some(rules)) => rules.iter().all(|r| vmm_rules.contains(r)),
            };
            assert!(wider, "{} allows syscall {nr} more widely than the VMM thread", class.name());
        }
    }
}

#[test]
fn worker_threads_cannot_open_files_or_sockets_or_spawn() {
    for class in [ThreadClass::Vcpu, ThreadClass::Dma] {
        for nr in [libc::SYS_openat, libc::SYS_socket, libc::SYS_clone3, libc::SYS_execve, libc::SYS_ptrace] {
            assert!(!class.allows_syscall(nr), "{} allows {nr}", class.name());
        }
    }
    for class in ThreadClass::ALL {
        for nr in [libc::SYS_execve, libc::SYS_ptrace, libc::SYS_fork, libc::SYS_mount, libc::SYS_kill] {
            assert!(!class.allows_syscall(nr), "{} allows {nr}", class.name());
        }
    }
}

#[test]
fn only_vcpu_threads_and_their_spawner_run_guests() {
    let kvm_run = rules::Cond { arg: 1, op: rules::Op::Eq, value: ioctls::KVM_RUN };
    let runs = |class: ThreadClass| {
        class
            .merged()
            .get(&libc::SYS_ioctl)
            .is_some_and(|r| r.as_ref().is_some_and(|r| r.iter().any(|c| c == &vec![kvm_run])))
    };
    assert!(runs(ThreadClass::Vcpu));
    assert!(!runs(ThreadClass::Api) && !runs(ThreadClass::EventLoop) && !runs(ThreadClass::Dma));
    assert!(!ThreadClass::Api.allows_syscall(libc::SYS_ioctl));
}

#[test]
fn every_thread_may_use_the_whole_allocator() {
    // glibc malloc on any thread may grow the main arena (brk), map or trim an arena (mmap,
    // munmap, madvise DONTNEED) or move a large block (mremap): an allocation is never a reason
    // to kill the process.
    for class in ThreadClass::ALL {
        for nr in
            [libc::SYS_brk, libc::SYS_mmap, libc::SYS_munmap, libc::SYS_mremap, libc::SYS_madvise, libc::SYS_mprotect]
        {
            assert!(class.allows_syscall(nr), "{} refuses {nr}", class.name());
        }
    }
}

#[test]
fn ioctl_and_mmap_always_have_argument_checks() {
    for class in ThreadClass::ALL {
        let merged = class.merged();
        for nr in
            [libc::SYS_ioctl, libc::SYS_mmap, libc::SYS_mprotect, libc::SYS_fcntl, libc::SYS_socket, libc::SYS_futex]
        {
            assert!(!matches!(merged.get(&nr), Some(None)), "{} allows {nr} with any arguments", class.name());
        }
    }
}

#[test]
fn counts_per_class() {
    let counts: Vec<(&str, usize)> = ThreadClass::ALL.iter().map(|c| (c.name(), c.allowed_syscalls())).collect();
    for (name, count) in &counts {
        assert!((10..=120).contains(count), "{name}: {count}");
    }
    // The VMM thread's own rules, without what it holds for the threads it spawns.
    let mut own = BTreeMap::new();
    merge(&mut own, &classes::thread());
    merge(&mut own, &classes::vmm());
    assert!(own.len() < ThreadClass::Vmm.allowed_syscalls());
    println!("{counts:?}, the VMM thread's own: {}", own.len());
}
