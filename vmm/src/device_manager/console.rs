//! Where a VM's serial output goes: stdout, stdout with a per-VM line prefix, or a buffer.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// A VM's console sink. Clones of one `Capture` share the buffer.
#[derive(Clone, Debug, Default)]
pub enum Console {
    /// Bytes go to the VMM's stdout as they come.
    #[default]
    Stdout,
    /// Whole lines go to stdout, each preceded by the prefix (to tell VMs apart).
    Prefixed(String),
    /// Bytes are kept in memory (tests, or a VMM that forwards them elsewhere).
    Capture(Arc<Mutex<Vec<u8>>>),
}

impl Console {
    /// A capturing console and the buffer it fills.
    pub fn capture() -> (Console, Arc<Mutex<Vec<u8>>>) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        (Console::Capture(Arc::clone(&buf)), buf)
    }

    /// The writer the serial device writes into.
    pub fn writer(&self) -> ConsoleWriter {
        ConsoleWriter { console: self.clone(), line: Vec::new() }
    }
}

/// `Write` end of a [`Console`].
#[derive(Debug)]
pub struct ConsoleWriter {
    console: Console,
    /// Pending partial line of a `Prefixed` console.
    line: Vec<u8>,
}

impl ConsoleWriter {
    fn emit_line(prefix: &str, line: &[u8]) -> io::Result<()> {
        let mut out = io::stdout().lock();
        out.write_all(prefix.as_bytes())?;
        out.write_all(line)?;
        out.flush()
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.console {
            Console::Stdout => io::stdout().lock().write_all(buf)?,
            Console::Capture(shared) => shared.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf),
            Console::Prefixed(prefix) => {
                for &byte in buf {
                    self.line.push(byte);
                    if byte == b'\n' {
                        Self::emit_line(prefix, &self.line)?;
                        self.line.clear();
                    }
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &self.console {
            Console::Stdout => io::stdout().lock().flush(),
            _ => Ok(()),
        }
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        if let Console::Prefixed(prefix) = &self.console {
            if !self.line.is_empty() {
                self.line.push(b'\n');
                // Best effort: the VM is gone, there is nobody to report a failed write to.
                let _ = Self::emit_line(prefix, &self.line);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn capture_shares_the_buffer() {
        let (console, buf) = Console::capture();
        let mut w = console.writer();
        w.write_all(b"abc").unwrap();
        console.writer().write_all(b"d").unwrap();
        assert_eq!(&*buf.lock().unwrap(), b"abcd");
    }
}
