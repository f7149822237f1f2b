//! Zero-downtime binary upgrade: a new `gatehouse` process takes the listening sockets over from
//! the running one through a Unix socket, so that no connection is refused; the old one then
//! stops accepting, finishes what it has in flight and exits.
//!
//! Neighbours: `cli.rs` binds the upgrade socket (`bind`) and runs `serve` in the running
//! process, or calls `take_over` in the new one before `app::Gatehouse::start_from` adopts the
//! sockets (`reload.rs` matches them to the config's listeners); `app.rs` ends the old process
//! with `Gatehouse::finish_handoff`.
//!
//! The exchange, one JSON object per line over a Unix stream socket, each descriptor sent with
//! `SCM_RIGHTS` on the line that describes it:
//!
//! ```text
//!  new                                old
//!  hello {version}           ───►
//!                            ◄───     offer {version, pid, sockets: N}      (or refused {reason})
//!                            ◄───     socket {kind, name, listen} + fd      × N: every listener,
//!                                                                           the admin API, and
//!                                                                           the upgrade socket
//!  (adopts, binds the rest, accepts)
//!  taken                     ───►     (or abort {reason}, or hangs up: the old carries on)
//!                            ◄───     released  (its accept loops have stopped; it drains)
//!  (serves handoffs on the inherited upgrade socket)
//! ```
//!
//! Both processes hold the same listening sockets (the same open file descriptions) until the
//! old one lets go, and the kernel hands each queued connection to whichever calls `accept`: a
//! connection is never refused, and none waiting in a queue is lost when the old one closes its
//! copy. The upgrade socket itself is handed over too, so its path never goes away and a later
//! upgrade works the same way.
//!
//! Only a process of the same user (or root) may take over: the peer's credentials are checked
//! (`SO_PEERCRED`), and the socket file is made mode 0600.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::app::{Inherited, Shared};
use crate::reload::{FdSlot, Reloader};

/// The version of the exchange below; both sides must speak the same.
const VERSION: u32 = 1;
/// How long either side waits for each message of the exchange.
const STEP: Duration = Duration::from_secs(10);
/// How long the old process waits for the new one to start (it may resolve upstream names
/// first) before it gives up on it and carries on alone.
const START_WAIT: Duration = Duration::from_secs(120);
/// The longest line either side accepts.
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
enum Message {
    /// New to old: send me your sockets.
    Hello { version: u32 },
    /// Old to new: `sockets` lines of `Socket` follow, each with its descriptor.
    Offer {
        version: u32,
        pid: u32,
        sockets: usize,
    },
    /// Old to new: no handoff.
    Refused { reason: String },
    /// Old to new: one socket (with its descriptor).
    Socket {
        kind: Kind,
        name: String,
        /// The configured address (listeners and admin API).
        listen: Option<SocketAddr>,
    },
    /// New to old: I accept on the sockets now; stop.
    Taken,
    /// New to old: I could not start; carry on.
    Abort { reason: String },
    /// Old to new: my accept loops have stopped; I drain and exit.
    Released,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Listener,
    Admin,
    Upgrade,
}

/// Binds the upgrade socket at `path` for a process that starts afresh. A file left there by a
/// process that is gone (nothing answers on it) is removed first; one that a live process
/// answers on is an error: that process is to be taken over (`--takeover`), not doubled.
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(format!(
                "{shown}: exists and is not a socket; not replacing it"
            ));
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(format!(
                    "{shown}: a running gatehouse answers there; to upgrade it, start this one \
                     with --takeover"
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!("{shown}: removing the socket of a process that is gone");
                std::fs::remove_file(path)
                    .map_err(|e| format!("{shown}: cannot remove the stale socket: {e}"))?;
            }
            Err(e) => return Err(format!("{shown}: cannot probe the existing socket: {e}")),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{shown}: {e}")),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| format!("{shown}: cannot listen for upgrades: {e}"))?;
    // Taking over stops this process: only its own user may (the credentials are checked too).
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{shown}: {e}"))?;
    to_tokio(listener).map_err(|e| format!("{shown}: {e}"))
}

fn to_tokio(listener: std::os::unix::net::UnixListener) -> io::Result<UnixListener> {
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// What the handoff server needs of the running process.
#[derive(Clone)]
pub struct Handover {
    shared: Arc<Shared>,
    reloader: Arc<Reloader>,
    admin: Option<(SocketAddr, FdSlot)>,
    admin_stop: CancellationToken,
    handed_off: CancellationToken,
}

impl Handover {
    pub(crate) fn new(
        shared: Arc<Shared>,
        reloader: Arc<Reloader>,
        admin: Option<(SocketAddr, FdSlot)>,
        admin_stop: CancellationToken,
        handed_off: CancellationToken,
    ) -> Handover {
        Handover {
            shared,
            reloader,
            admin,
            admin_stop,
            handed_off,
        }
    }
}

/// Serves takeover requests on `listener`, one at a time, until a new process has taken over
/// (its pid) or the drain begins (`None`). A takeover that fails leaves this process as it was.
pub async fn serve(listener: UnixListener, handover: Handover) -> Option<u32> {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = handover.shared.drain.cancelled() => return None,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "upgrade socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match serve_one(stream, &listener, &handover).await {
            Ok(Some(pid)) => return Some(pid),
            Ok(None) => {}
            Err(e) => tracing::warn!("takeover failed; this process keeps serving: {e}"),
        }
    }
}

/// One takeover request: `Some(pid)` of the process that took over, `None` when it did not.
async fn serve_one(
    stream: UnixStream,
    upgrade: &UnixListener,
    handover: &Handover,
) -> io::Result<Option<u32>> {
    let peer = rustix::net::sockopt::socket_peercred(&stream)?;
    let pid = u32::try_from(peer.pid.as_raw_pid()).unwrap_or(0);
    let mut conn = Conn::new(stream);
    let me = rustix::process::geteuid();
    if peer.uid != me && !peer.uid.is_root() {
        let reason = format!(
            "uid {} may not take over a process of uid {}",
            peer.uid.as_raw(),
            me.as_raw()
        );
        conn.refuse(&reason).await;
        return Err(io::Error::other(format!("pid {pid}: {reason}")));
    }
    match conn.recv(STEP).await? {
        // Someone checking whether a process answers here (`bind` in a process starting afresh).
        None => return Ok(None),
        Some(Message::Hello { version }) if version == VERSION => {}
        Some(Message::Hello { version }) => {
            let reason = format!("it speaks handoff version {version}, this process {VERSION}");
            conn.refuse(&reason).await;
            return Err(io::Error::other(format!("pid {pid}: {reason}")));
        }
        Some(other) => return Err(unexpected(&other)),
    }
    if handover.shared.is_draining() {
        conn.refuse("this process is shutting down").await;
        return Ok(None);
    }
    tracing::info!("pid {pid} asks to take the listening sockets over");
    let offer = match handover.reloader.offer().await {
        Ok(offer) => offer,
        Err(e) => {
            conn.refuse(&e.to_string()).await;
            return Ok(None);
        }
    };
    let admin = handover.admin.as_ref().and_then(|(listen, slot)| {
        let fd = slot.lock().unwrap_or_else(PoisonError::into_inner);
        let fd = fd.as_ref()?.try_clone().ok()?;
        Some((*listen, fd))
    });
    let count = offer.sockets.len() + usize::from(admin.is_some()) + 1;
    conn.send(
        &Message::Offer {
            version: VERSION,
            pid: std::process::id(),
            sockets: count,
        },
        None,
    )
    .await?;
    for l in &offer.sockets {
        tracing::debug!("handing over listener {} on {}", l.name, l.local);
        let socket = Message::Socket {
            kind: Kind::Listener,
            name: l.name.clone(),
            listen: Some(l.listen),
        };
        conn.send(&socket, Some(l.fd.as_fd())).await?;
    }
    if let Some((listen, fd)) = &admin {
        let socket = Message::Socket {
            kind: Kind::Admin,
            name: "admin".into(),
            listen: Some(*listen),
        };
        conn.send(&socket, Some(fd.as_fd())).await?;
    }
    let socket = Message::Socket {
        kind: Kind::Upgrade,
        name: "upgrade".into(),
        listen: None,
    };
    conn.send(&socket, Some(upgrade.as_fd())).await?;
    match conn.recv(START_WAIT).await {
        Ok(Some(Message::Taken)) => {}
        Ok(Some(Message::Abort { reason })) => {
            tracing::warn!("pid {pid} could not start, so this process keeps serving: {reason}");
            return Ok(None);
        }
        Ok(None) => {
            tracing::warn!("pid {pid} went away before taking over; this process keeps serving");
            return Ok(None);
        }
        Ok(Some(other)) => return Err(unexpected(&other)),
        Err(e) => return Err(io::Error::new(e.kind(), format!("pid {pid}: {e}"))),
    }
    // From here on the new process accepts: stop accepting here. The copies of the descriptors
    // this process holds close as its accept loops end; the sockets stay open in the new one.
    offer.commit();
    handover.admin_stop.cancel();
    handover.shared.end_keep_alive();
    if let Err(e) = conn.send(&Message::Released, None).await {
        tracing::debug!(error = %e, "pid {pid} did not wait for the release");
    }
    notify(&format!("MAINPID={pid}"));
    tracing::info!("handed the listening sockets over to pid {pid}; draining");
    handover.handed_off.cancel();
    Ok(Some(pid))
}

/// A process's takeover of the running one, after the sockets arrived and before it confirms.
pub struct Takeover {
    conn: Conn,
    old_pid: u32,
    sockets: Inherited,
    upgrade: Option<OwnedFd>,
}

/// Connects to the process serving handoffs on `path` and receives its sockets. Nothing changes
/// in that process until `Takeover::confirm`; dropping the `Takeover` (or `abort`) leaves it
/// serving as before.
pub async fn take_over(path: &Path) -> Result<Takeover, String> {
    let shown = path.display();
    let failed = |e: io::Error| format!("{shown}: takeover failed: {e}");
    let stream = match tokio::time::timeout(STEP, UnixStream::connect(path)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!(
                "{shown}: no such socket: no gatehouse runs with --upgrade-socket {shown} \
                 (to start one, leave out --takeover)"
            ))
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(format!(
                "{shown}: nothing listens there (the socket is left over from a process that is \
                 gone; to start afresh, leave out --takeover)"
            ))
        }
        Ok(Err(e)) => return Err(format!("{shown}: cannot connect: {e}")),
        Err(_) => return Err(format!("{shown}: no answer within {STEP:?}")),
    };
    // The kernel's word for who listens there, rather than what it says in its offer: the
    // pid decides, at `confirm`, whether the old process is still running.
    let peer_pid = rustix::net::sockopt::socket_peercred(&stream)
        .ok()
        .and_then(|c| u32::try_from(c.pid.as_raw_pid()).ok());
    let mut conn = Conn::new(stream);
    conn.send(&Message::Hello { version: VERSION }, None)
        .await
        .map_err(failed)?;
    let (old_pid, count) = match conn.recv(STEP).await.map_err(failed)? {
        Some(Message::Offer {
            version,
            pid,
            sockets,
        }) if version == VERSION => (peer_pid.unwrap_or(pid), sockets),
        Some(Message::Offer { version, .. }) => {
            return Err(format!(
                "{shown}: the running process speaks handoff version {version}, this one \
                 {VERSION}"
            ))
        }
        Some(Message::Refused { reason }) => {
            return Err(format!(
                "{shown}: the running process refused the takeover: {reason}"
            ))
        }
        Some(other) => return Err(failed(unexpected(&other))),
        None => {
            return Err(format!(
                "{shown}: the running process hung up without an answer"
            ))
        }
    };
    let mut sockets = Inherited::default();
    let mut upgrade = None;
    for _ in 0..count {
        let (kind, name, listen) = match conn.recv(STEP).await.map_err(failed)? {
            Some(Message::Socket { kind, name, listen }) => (kind, name, listen),
            Some(other) => return Err(failed(unexpected(&other))),
            None => return Err(format!("{shown}: the running process hung up mid-offer")),
        };
        let fd = conn
            .fds
            .pop_front()
            .ok_or_else(|| format!("{shown}: socket {name} came without its descriptor"))?;
        let need_listen = || format!("{shown}: socket {name} came without its address");
        match kind {
            Kind::Listener => {
                let listen = listen.ok_or_else(need_listen)?;
                sockets
                    .listeners
                    .push((name, listen, std::net::TcpListener::from(fd)));
            }
            Kind::Admin => {
                let listen = listen.ok_or_else(need_listen)?;
                sockets.admin = Some((listen, std::net::TcpListener::from(fd)));
            }
            Kind::Upgrade => upgrade = Some(fd),
        }
    }
    tracing::info!(
        "pid {old_pid} sent {} listening socket(s){}",
        sockets.listeners.len(),
        if sockets.admin.is_some() {
            " and its admin API's"
        } else {
            ""
        }
    );
    Ok(Takeover {
        conn,
        old_pid,
        sockets,
        upgrade,
    })
}

impl Takeover {
    /// The pid of the process taken over from.
    pub fn old_pid(&self) -> u32 {
        self.old_pid
    }

    /// The sockets received, for `Gatehouse::start_from`.
    pub fn take_sockets(&mut self) -> Inherited {
        std::mem::take(&mut self.sockets)
    }

    /// This process could not start: the old one carries on as before.
    pub async fn abort(mut self, reason: &str) {
        let abort = Message::Abort {
            reason: reason.to_owned(),
        };
        let _ = self.conn.send(&abort, None).await;
    }

    /// This process accepts on the sockets now: the old one stops accepting and drains. On
    /// success, the upgrade socket (inherited too, for the next upgrade), or why it cannot be
    /// used. `Err(NotReleased)` when the old process did not let go and still runs (it gave up
    /// waiting, or broke off): both would then accept on the same sockets, so this one must
    /// drain and exit instead, and the old one serves on as before.
    pub async fn confirm(mut self) -> Result<Result<UnixListener, String>, NotReleased> {
        let old = self.old_pid;
        let outcome = match self.conn.send(&Message::Taken, None).await {
            Err(e) => Err(format!("could not tell it this process took over: {e}")),
            Ok(()) => match self.conn.recv(STEP).await {
                Ok(Some(Message::Released)) => Ok(()),
                Ok(Some(other)) => Err(format!("it answered the takeover with {other:?}")),
                Ok(None) => Err("it hung up without releasing the sockets".to_owned()),
                Err(e) => Err(format!("it did not confirm the takeover: {e}")),
            },
        };
        match outcome {
            Ok(()) => {
                tracing::info!("took over from pid {old}, which stops accepting and drains");
            }
            Err(why) if is_alive(old) => return Err(NotReleased { pid: old, why }),
            // It is gone (it released the sockets and exited, or it died): this process is the
            // only one left, so it serves.
            Err(why) => tracing::warn!("pid {old}: {why}; it has exited, so this process serves"),
        }
        let upgrade = match self.upgrade {
            Some(fd) => to_tokio(std::os::unix::net::UnixListener::from(fd))
                .map_err(|e| format!("the inherited upgrade socket: {e}")),
            None => Err("the old process did not send its upgrade socket".to_owned()),
        };
        Ok(upgrade)
    }
}

/// The old process did not let go of the sockets and still runs; see `Takeover::confirm`.
#[derive(Debug, thiserror::Error)]
#[error("pid {pid} did not hand the sockets over ({why}) and still serves")]
pub struct NotReleased {
    pub pid: u32,
    pub why: String,
}

/// Whether process `pid` exists (signal 0; a process of another user counts too).
fn is_alive(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        Err(e) => e == rustix::io::Errno::PERM,
    }
}

/// Tells systemd (`$NOTIFY_SOCKET`, see sd_notify(3)) about a change of state, when it asked:
/// `READY=1` once listening, `MAINPID=N` when process N took over. Without the variable, this
/// does nothing.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = std::os::unix::net::UnixDatagram::unbound().and_then(|socket| {
        match target.as_bytes().strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            None => socket.send_to(state.as_bytes(), &target),
        }
    });
    match sent {
        Ok(_) => tracing::debug!("told systemd {state}"),
        Err(e) => tracing::warn!("cannot tell systemd {state} on {target:?}: {e}"),
    }
}

fn unexpected(msg: &Message) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected message {msg:?}"),
    )
}

/// One end of the exchange: lines out, each with at most one descriptor; lines and descriptors
/// in, in the order they were sent.
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

impl Conn {
    fn new(stream: UnixStream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
            fds: VecDeque::new(),
        }
    }

    async fn send(&mut self, msg: &Message, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
        line.push(b'\n');
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        let stream = &self.stream;
        let send = stream.async_io(Interest::WRITABLE, || {
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(io::Error::other("no room for the descriptor"));
            }
            let iov = [IoSlice::new(&line)];
            Ok(rustix::net::sendmsg(
                stream,
                &iov,
                &mut control,
                SendFlags::NOSIGNAL,
            )?)
        });
        let sent = tokio::time::timeout(STEP, send)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the peer stopped reading"))??;
        // The descriptor went with the first bytes; the rest of a long line follows plainly.
        if sent < line.len() {
            tokio::time::timeout(STEP, self.stream.write_all(&line[sent..]))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "the peer stopped reading")
                })??;
        }
        Ok(())
    }

    /// The next message, or `None` when the peer hung up between two.
    async fn recv(&mut self, limit: Duration) -> io::Result<Option<Message>> {
        match tokio::time::timeout(limit, self.recv_line()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {limit:?}"),
            )),
        }
    }

    async fn recv_line(&mut self) -> io::Result<Option<Message>> {
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                let msg = serde_json::from_slice(&line[..at]).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "not a handoff message ({e}): {}",
                            String::from_utf8_lossy(&line)
                        ),
                    )
                })?;
                return Ok(Some(msg));
            }
            if self.buf.len() > MAX_LINE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a handoff message longer than 64 KiB",
                ));
            }
            let mut chunk = [0u8; 4096];
            let stream = &self.stream;
            let (n, fds, truncated) = stream
                .async_io(Interest::READABLE, || {
                    // A read stops after the bytes that carried descriptors, so one line's
                    // worth of room is plenty; more is there in case two lines arrive glued.
                    let mut space =
                        [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(4))];
                    let mut control = RecvAncillaryBuffer::new(&mut space);
                    let mut iov = [IoSliceMut::new(&mut chunk)];
                    let got = rustix::net::recvmsg(
                        stream,
                        &mut iov,
                        &mut control,
                        RecvFlags::CMSG_CLOEXEC,
                    )?;
                    let mut fds = Vec::new();
                    for message in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(received) = message {
                            fds.extend(received);
                        }
                    }
                    Ok((got.bytes, fds, got.flags.contains(ReturnFlags::CTRUNC)))
                })
                .await?;
            self.fds.extend(fds);
            if truncated {
                return Err(io::Error::other("descriptors were lost in transit"));
            }
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Says why there is no handoff; the peer may be gone already.
    async fn refuse(&mut self, reason: &str) {
        let refused = Message::Refused {
            reason: reason.to_owned(),
        };
        let _ = self.send(&refused, None).await;
    }
}
