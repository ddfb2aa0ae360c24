//! Large answer buffers that the kernel sends without copying them (Linux).
//!
//! A week's breakdown sent as is is about half a megabyte of JSON, and copying it from the
//! process into the socket was the largest single cost of a served request (the cached
//! answer itself costs a lookup). [`shared`] puts such a buffer in a sealed memory file
//! (`memfd`) mapped read-only: the [`Bytes`] that the answer holds are that mapping, and
//! [`SendfileIo`], the connection's stream, sends any slice of a mapping with `sendfile(2)`
//! from the file instead of `write(2)` from memory. The socket then refers to the file's
//! pages: the bytes are copied once, by the receiver (or by the network card), as Kafka and
//! nginx send files.
//!
//! A mapping is registered by its address range while it lives, so a slice handed to the
//! stream (hyper writes the body's buffers as they are) is recognised by its pointer. The
//! file is sealed against writes and resizing before it is mapped: its contents never change,
//! so a page the kernel is still sending is the page that was answered. Elsewhere than on
//! Linux, and for buffers under [`MIN_SHARED`] or past [`MAX_SHARED`], buffers are plain
//! memory and the stream writes them. So it does with slices of a shared buffer under
//! [`MIN_SHARED`] (an answer's rows can be many short runs of a part, with commas between):
//! one `writev` of them all costs less than a system call for each.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Buffers from this size up are shared (each costs a file and a mapping); smaller ones are
/// written.
pub const MIN_SHARED: usize = 64 << 10;

/// Buffers past this size stay in memory. Over loopback, answers of 945 KB and 1.6 MB were
/// sent at half the rate with `sendfile` as with `writev` (1,000 against 2,200 a second for
/// the 1.6 MB ones), where the 447 KB ones went 1.2× faster (`docs/performance.md`).
/// Sending a large answer in pieces did not change it; why is not established.
pub const MAX_SHARED: usize = 512 << 10;

/// `text` as [`Bytes`]: in a sealed memory file when it is large enough (and the system
/// allows), else in memory as it is.
pub fn shared(text: Vec<u8>) -> Bytes {
    #[cfg(target_os = "linux")]
    if (MIN_SHARED..=MAX_SHARED).contains(&text.len()) {
        match linux::Mapping::new(&text) {
            Ok(m) => return Bytes::from_owner(m),
            Err(e) => {
                tracing::debug!(error = %e, bytes = text.len(), "an answer buffer stays in memory")
            }
        }
    }
    Bytes::from(text)
}

/// Whether `bytes` is (a slice of) a shared buffer.
#[cfg(test)]
fn is_shared(bytes: &[u8]) -> bool {
    #[cfg(target_os = "linux")]
    return linux::find(bytes).is_some();
    #[cfg(not(target_os = "linux"))]
    {
        let _ = bytes;
        false
    }
}

/// A connection's TCP stream that sends shared buffers with `sendfile(2)`.
#[derive(Debug)]
pub struct SendfileIo {
    stream: TcpStream,
}

impl SendfileIo {
    pub fn new(stream: TcpStream) -> Self {
        SendfileIo { stream }
    }
}

impl AsyncRead for SendfileIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendfileIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        #[cfg(target_os = "linux")]
        if let Some(sent) = linux::poll_send(&self.stream, cx, bufs) {
            return sent;
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::collections::BTreeMap;
    use std::io::{self, IoSlice};
    use std::os::fd::OwnedFd;
    use std::sync::{Arc, OnceLock, RwLock};
    use std::task::{ready, Context, Poll};

    use rustix::fs::{memfd_create, MemfdFlags, SealFlags};
    use rustix::mm::{MapFlags, ProtFlags};
    use rustix::net::{SendAncillaryBuffer, SendFlags};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    /// The live mappings by start address: their length and file.
    static MAPPINGS: RwLock<BTreeMap<usize, (usize, Arc<OwnedFd>)>> = RwLock::new(BTreeMap::new());

    /// The most mappings alive at once: each holds a file descriptor, and connections need
    /// theirs (a quarter of the process's limit, at most 4,096).
    fn most_mappings() -> usize {
        static MOST: OnceLock<usize> = OnceLock::new();
        *MOST.get_or_init(|| {
            let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
            (limit.unwrap_or(u64::MAX) / 4).min(4096) as usize
        })
    }

    /// A sealed memory file mapped read-only; unregistered and unmapped when dropped.
    #[derive(Debug)]
    pub(super) struct Mapping {
        address: usize,
        len: usize,
    }

    impl Mapping {
        pub(super) fn new(text: &[u8]) -> io::Result<Self> {
            if MAPPINGS.read().unwrap_or_else(|e| e.into_inner()).len() >= most_mappings() {
                return Err(io::Error::other(
                    "as many answer buffers are shared as allowed",
                ));
            }
            let fd = memfd_create(
                "tandem-answer",
                MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
            )?;
            let mut rest = text;
            while !rest.is_empty() {
                let n = rustix::io::write(&fd, rest)?;
                rest = &rest[n..];
            }
            rustix::fs::fcntl_add_seals(
                &fd,
                SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
            )?;
            let len = text.len();
            // SAFETY: a new read-only shared mapping of the whole file, at an address the
            // kernel chooses; the file is sealed against writes and resizing, so the mapped
            // bytes never change and are never cut off while mapped.
            #[allow(unsafe_code)]
            let address = unsafe {
                rustix::mm::mmap(
                    std::ptr::null_mut(),
                    len,
                    ProtFlags::READ,
                    MapFlags::SHARED,
                    &fd,
                    0,
                )?
            } as usize;
            MAPPINGS
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(address, (len, Arc::new(fd)));
            Ok(Mapping { address, len })
        }
    }

    impl AsRef<[u8]> for Mapping {
        fn as_ref(&self) -> &[u8] {
            // SAFETY: `address..address + len` is this mapping's, readable and unchanging
            // (see `new`) until `drop` unmaps it, which no borrow of `self` outlives.
            #[allow(unsafe_code)]
            unsafe {
                std::slice::from_raw_parts(self.address as *const u8, self.len)
            }
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            MAPPINGS
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.address);
            // SAFETY: the mapping `new` made; no slice of it is alive (the `Bytes` holding
            // it are gone), and the socket buffers refer to the file's pages, not to it.
            #[allow(unsafe_code)]
            if let Err(e) = unsafe { rustix::mm::munmap(self.address as *mut _, self.len) } {
                tracing::warn!(error = %e, "unmapping an answer buffer failed");
            }
        }
    }

    /// The file and offset of `bytes`, if they lie in a live mapping.
    pub(super) fn find(bytes: &[u8]) -> Option<(Arc<OwnedFd>, u64)> {
        if bytes.is_empty() {
            return None;
        }
        let start = bytes.as_ptr() as usize;
        let mappings = MAPPINGS.read().unwrap_or_else(|e| e.into_inner());
        let (&address, (len, fd)) = mappings.range(..=start).next_back()?;
        (start + bytes.len() <= address + len).then(|| (Arc::clone(fd), (start - address) as u64))
    }

    #[cfg(test)]
    pub(super) fn registered(address: usize) -> bool {
        MAPPINGS
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&address)
    }

    /// Sends `bufs` when one of them is a slice of a shared buffer of at least
    /// [`MIN_SHARED`](super::MIN_SHARED) bytes: the buffers before it with `MSG_MORE` (so
    /// that they leave with its first bytes), or, when it comes first, its bytes from its
    /// file. `None` when none is.
    pub(super) fn poll_send(
        stream: &TcpStream,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Option<Poll<io::Result<usize>>> {
        let (at, (fd, offset)) = bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= super::MIN_SHARED)
            .find_map(|(i, b)| find(b).map(|f| (i, f)))?;
        let send = || -> io::Result<usize> {
            if at > 0 {
                let mut control = SendAncillaryBuffer::default();
                return Ok(rustix::net::sendmsg(
                    stream,
                    &bufs[..at],
                    &mut control,
                    SendFlags::MORE | SendFlags::NOSIGNAL,
                )?);
            }
            let mut offset = offset;
            Ok(rustix::fs::sendfile(
                stream,
                &*fd,
                Some(&mut offset),
                bufs[0].len(),
            )?)
        };
        Some(send_when_ready(stream, cx, send))
    }

    fn send_when_ready(
        stream: &TcpStream,
        cx: &mut Context<'_>,
        send: impl Fn() -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(stream.poll_write_ready(cx))?;
            match stream.try_io(Interest::WRITABLE, &send) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                sent => return Poll::Ready(sent),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn text(len: usize) -> Vec<u8> {
        (0..len).map(|i| b'a' + (i % 26) as u8).collect()
    }

    #[test]
    fn large_buffers_are_shared_small_ones_are_not_and_both_read_alike() {
        assert!(!is_shared(&shared(text(MAX_SHARED + 1))));
        let big = text(MIN_SHARED + 12_345);
        let shared = shared(big.clone());
        assert_eq!(&shared[..], &big[..]);
        assert_eq!(is_shared(&shared), cfg!(target_os = "linux"));
        assert_eq!(
            is_shared(&shared.slice(100..2_000)),
            cfg!(target_os = "linux")
        );
        let small = super::shared(text(1_000));
        assert!(!is_shared(&small));
        #[cfg(target_os = "linux")]
        {
            // Once dropped, its range is no longer taken for a shared buffer.
            let address = shared.as_ptr() as usize;
            assert!(linux::registered(address));
            drop(shared);
            assert!(!linux::registered(address));
        }
    }

    /// Headers, then slices of shared and plain buffers, through a socket whose receiver
    /// reads slowly (so that sends stop at a full buffer and resume): the bytes arrive in
    /// order, each once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shared_and_plain_buffers_arrive_whole_and_in_order_through_a_slow_reader() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let big = shared(text(MAX_SHARED));
        assert_eq!(is_shared(&big), cfg!(target_os = "linux"));
        let plain = Bytes::from(text(100_000));
        let parts: Vec<Bytes> = vec![
            Bytes::from_static(b"HTTP/1.1 200 OK\r\n\r\n"),
            big.slice(5..(MAX_SHARED - 1000)),
            big.slice(100..200),
            Bytes::from_static(b","),
            plain.clone(),
            big.slice((MAX_SHARED / 3)..MAX_SHARED),
        ];
        let expected: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let sender = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            // A small send buffer: sends stop part-way and resume when it drains.
            #[cfg(target_os = "linux")]
            rustix::net::sockopt::set_socket_send_buffer_size(&stream, 16 << 10).unwrap();
            let mut io = SendfileIo::new(stream);
            // As hyper does: every remaining buffer at once, advancing by what was written.
            let mut queue: std::collections::VecDeque<Bytes> = parts.into();
            while !queue.is_empty() {
                let slices: Vec<IoSlice<'_>> = queue.iter().map(|b| IoSlice::new(b)).collect();
                let mut n = io.write_vectored(&slices).await.unwrap();
                assert!(n > 0);
                while n > 0 {
                    let front = queue.front_mut().unwrap();
                    let take = n.min(front.len());
                    let _ = front.split_to(take);
                    n -= take;
                    if front.is_empty() {
                        queue.pop_front();
                    }
                }
            }
            io.shutdown().await.unwrap();
        });
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 << 10).unwrap();
        let mut client = socket.connect(address).await.unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 7_919];
        for reads in 0.. {
            let n = client.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if reads % 50 == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        sender.await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the bytes differ");
    }
}
