//! An eventfd that tells an event loop "completions are waiting".
//!
//! Workers write after pushing a completion; the consumer resets it before
//! draining, so a completion pushed after the reset always raises a new signal and
//! none is ever missed. A spurious wakeup (signal with nothing to drain) is harmless.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// A non-blocking, close-on-exec eventfd.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// Creates the eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Makes the fd readable (adds one to its counter).
    pub fn signal(&self) {
        let one: u64 = 1;
        loop {
            // SAFETY: writes 8 bytes from a live u64 to our own descriptor.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
            // EAGAIN means the counter is saturated: it is readable anyway.
            if n == 8 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return;
            }
        }
    }

    /// Resets the counter to zero (not readable until the next signal).
    pub fn reset(&self) {
        let mut value: u64 = 0;
        loop {
            // SAFETY: reads 8 bytes into a live u64 from our own descriptor.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
            // EAGAIN: already zero.
            if n == 8 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return;
            }
        }
    }

    /// Waits until readable or `timeout` passes (None: forever); true when readable.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let mut fds = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = timeout.map_or(-1, |t| {
            // Round up so a sub-millisecond timeout still waits instead of spinning.
            i32::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
        });
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut fds, 1, millis) };
        n > 0 && fds.revents & libc::POLLIN != 0
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_makes_it_readable_and_reset_clears_it() {
        let fd = EventFd::new().unwrap();
        assert!(!fd.wait(Some(Duration::from_millis(1))));
        fd.signal();
        fd.signal();
        assert!(fd.wait(Some(Duration::ZERO)));
        fd.reset();
        assert!(!fd.wait(Some(Duration::ZERO)));
        fd.reset(); // resetting an unsignalled fd is a no-op
    }
}
