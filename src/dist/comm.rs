//! The host side of a data-parallel job ([`Comm`]): the processes meet at rank 0 over TCP
//! ([`Comm::rendezvous`]) and keep those connections (a star around rank 0) for the
//! collectives the trainer needs on the host: gathering validation scores, broadcasting
//! small values (the NCCL unique id), summing gradients where no device communicator is
//! attached (the CPU backend), and spreading the news that a rank failed.
//!
//! Every collective is deterministic and gives every rank the same bits: rank 0 combines the
//! contributions in rank order and sends the result back. Every receive has the watchdog
//! timeout (rank 0's; the others wait twice as long for rank 0, which may itself be waiting
//! out a silent rank before it names it); a rank whose connection closes, who reports a
//! failure ([`Comm::abort`]) or who stays silent past the timeout makes every other rank's
//! next collective fail with an error naming it (rank 0 forwards the news before it fails
//! itself), so no rank hangs.
//!
//! Messages are framed `[tag u8][length u64 LE][payload]`; the tag tells data from a
//! failure report.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::Float;
use crate::{Error, Result};

/// Seconds a rank waits for a collective's message before it declares the rank it waits on
/// lost (override with [`TIMEOUT_ENV`]).
pub const DEFAULT_TIMEOUT_S: u64 = 1800;
/// Environment variable overriding [`DEFAULT_TIMEOUT_S`] (seconds, ≥ 1).
pub const TIMEOUT_ENV: &str = "MGKD_DIST_TIMEOUT_S";
/// Seconds rank 0 waits for every rank to arrive at the rendezvous, and the others keep
/// trying to reach it (override with [`RENDEZVOUS_TIMEOUT_ENV`]).
pub const DEFAULT_RENDEZVOUS_TIMEOUT_S: u64 = 300;
/// Environment variable overriding [`DEFAULT_RENDEZVOUS_TIMEOUT_S`] (seconds, ≥ 1).
pub const RENDEZVOUS_TIMEOUT_ENV: &str = "MGKD_RENDEZVOUS_TIMEOUT_S";

/// First bytes of a rank's greeting at the rendezvous.
const HELLO: &[u8; 8] = b"MGKD-DP1";
/// Frame tag of data.
const TAG_DATA: u8 = 0;
/// Frame tag of a failure report (payload: UTF-8 text).
const TAG_ABORT: u8 = 1;
/// Largest frame accepted (a corrupt length must not allocate without bound).
const MAX_FRAME: u64 = 1 << 36;

/// A seconds value from environment variable `name`, or `default`.
pub fn seconds_from_env(name: &str, default: u64) -> Result<Duration> {
    match std::env::var(name) {
        Err(_) => Ok(Duration::from_secs(default)),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(s) if s >= 1 => Ok(Duration::from_secs(s)),
            _ => Err(Error::invalid(format!(
                "{name}={v:?} is not a whole number of seconds ≥ 1"
            ))),
        },
    }
}

/// What went wrong on a link.
enum LinkError {
    /// The peer reported a failure (its text).
    Abort(String),
    /// Nothing arrived within the timeout.
    Timeout,
    /// The connection broke or closed.
    Closed(String),
}

/// A framed, bidirectional message channel between rank 0 and one other rank.
trait Link: Send {
    /// Sends one frame.
    fn send(&mut self, tag: u8, payload: &[u8]) -> std::result::Result<(), String>;
    /// Receives one frame, waiting at most `timeout`.
    fn recv(&mut self, timeout: Duration) -> std::result::Result<(u8, Vec<u8>), LinkError>;
}

impl Link for TcpStream {
    fn send(&mut self, tag: u8, payload: &[u8]) -> std::result::Result<(), String> {
        let mut head = [0u8; 9];
        head[0] = tag;
        head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        self.write_all(&head)
            .and_then(|()| self.write_all(payload))
            .and_then(|()| self.flush())
            .map_err(|e| e.to_string())
    }

    fn recv(&mut self, timeout: Duration) -> std::result::Result<(u8, Vec<u8>), LinkError> {
        let io = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => LinkError::Timeout,
            _ => LinkError::Closed(e.to_string()),
        };
        self.set_read_timeout(Some(timeout)).map_err(io)?;
        let mut head = [0u8; 9];
        self.read_exact(&mut head).map_err(io)?;
        let mut len = [0u8; 8];
        len.copy_from_slice(&head[1..]);
        let len = u64::from_le_bytes(len);
        if len > MAX_FRAME {
            return Err(LinkError::Closed(format!(
                "a frame of {len} bytes (corrupt stream)"
            )));
        }
        let mut payload = vec![0u8; len as usize];
        self.read_exact(&mut payload).map_err(io)?;
        match head[0] {
            TAG_DATA => Ok((TAG_DATA, payload)),
            TAG_ABORT => Err(LinkError::Abort(
                String::from_utf8_lossy(&payload).into_owned(),
            )),
            t => Err(LinkError::Closed(format!(
                "a frame with unknown tag {t} (corrupt stream)"
            ))),
        }
    }
}

/// One end of an in-process link (a pair of channels): the ranks of [`Comm::local_group`].
struct LocalLink {
    tx: Sender<(u8, Vec<u8>)>,
    rx: Receiver<(u8, Vec<u8>)>,
}

impl Link for LocalLink {
    fn send(&mut self, tag: u8, payload: &[u8]) -> std::result::Result<(), String> {
        self.tx
            .send((tag, payload.to_vec()))
            .map_err(|_| "the other end is gone".to_string())
    }

    fn recv(&mut self, timeout: Duration) -> std::result::Result<(u8, Vec<u8>), LinkError> {
        match self.rx.recv_timeout(timeout) {
            Ok((TAG_ABORT, p)) => Err(LinkError::Abort(String::from_utf8_lossy(&p).into_owned())),
            Ok(m) => Ok(m),
            Err(RecvTimeoutError::Timeout) => Err(LinkError::Timeout),
            Err(RecvTimeoutError::Disconnected) => {
                Err(LinkError::Closed("the other end is gone".into()))
            }
        }
    }
}

/// The links of this rank, and the first failure seen (after which every collective fails
/// with it).
struct Links {
    /// Rank 0: the link to rank `k` at index `k − 1`. Other ranks: the link to rank 0.
    peers: Vec<Box<dyn Link>>,
    failed: Option<String>,
}

/// This process's membership of a data-parallel job (see the module documentation).
pub struct Comm {
    /// Whether this process belongs to a launched job (false only for [`Comm::solo`]).
    joined: bool,
    rank: usize,
    world: usize,
    timeout: Duration,
    links: Mutex<Links>,
    /// A device communicator the backend attached ([`crate::backend::Backend::attach_comm`]).
    device: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Comm(rank {} of {})", self.rank, self.world)
    }
}

impl Comm {
    fn new(rank: usize, world: usize, peers: Vec<Box<dyn Link>>, timeout: Duration) -> Comm {
        Comm {
            joined: true,
            rank,
            world,
            timeout,
            links: Mutex::new(Links {
                peers,
                failed: None,
            }),
            device: Mutex::new(None),
        }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The device communicator slot (set by a backend that has one, read by its
    /// all-reduce).
    pub fn device_slot(&self) -> MutexGuard<'_, Option<Box<dyn std::any::Any + Send>>> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A process on its own, not launched as part of a job: every collective returns its
    /// input, and the trainer runs as it does without a launcher.
    pub fn solo() -> Comm {
        Comm {
            joined: false,
            ..Comm::new(0, 1, Vec::new(), Duration::from_secs(DEFAULT_TIMEOUT_S))
        }
    }

    /// Whether this process was launched as a rank of a job (even a job of one process, which
    /// then runs the data-parallel path: its shares are 1 and its sums are over itself).
    pub fn joined(&self) -> bool {
        self.joined
    }

    /// `world` ranks in this process, joined by channels (rank `k` is element `k`): for tests,
    /// each rank driven by its own thread.
    pub fn local_group(world: usize, timeout: Duration) -> Vec<Comm> {
        let mut root_links: Vec<Box<dyn Link>> = Vec::new();
        let mut others = Vec::new();
        for k in 1..world {
            let (to_k, from_root) = std::sync::mpsc::channel();
            let (to_root, from_k) = std::sync::mpsc::channel();
            root_links.push(Box::new(LocalLink {
                tx: to_k,
                rx: from_k,
            }));
            let link: Box<dyn Link> = Box::new(LocalLink {
                tx: to_root,
                rx: from_root,
            });
            others.push(Comm::new(k, world, vec![link], timeout));
        }
        let mut all = vec![Comm::new(0, world, root_links, timeout)];
        all.extend(others);
        all
    }

    /// Meets the other ranks of a job of `world` processes at `addr:port` over TCP: rank 0
    /// listens there and waits up to `wait` for every other rank to connect; the others keep
    /// trying to reach it for as long. Errors name the ranks that did not arrive, or the
    /// address that could not be reached.
    pub fn rendezvous(
        rank: usize,
        world: usize,
        addr: &str,
        port: u16,
        wait: Duration,
        timeout: Duration,
    ) -> Result<Comm> {
        if world <= 1 {
            return Ok(Comm::new(0, 1, Vec::new(), timeout));
        }
        let peers = if rank == 0 {
            accept_ranks(world, port, wait)?
        } else {
            vec![connect_to_root(rank, world, addr, port, wait)?]
        };
        let comm = Comm::new(rank, world, peers, timeout);
        // Everyone has arrived when rank 0 says so.
        comm.broadcast_bytes(Vec::new())?;
        Ok(comm)
    }

    /// How long a rank other than 0 waits for rank 0: twice the timeout, so that when
    /// another rank stays silent, rank 0 (which waits `timeout` for it) names it first.
    fn root_wait(&self) -> Duration {
        self.timeout.saturating_mul(2)
    }

    /// Locks the links; fails at once when a failure has been seen.
    fn links(&self) -> Result<MutexGuard<'_, Links>> {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        match &links.failed {
            Some(why) => Err(Error::Distributed(why.clone())),
            None => Ok(links),
        }
    }

    /// Records `why` as the job's failure and, on rank 0, tells every other rank.
    fn fail(&self, links: &mut Links, why: String) -> Error {
        if self.rank == 0 {
            for p in links.peers.iter_mut() {
                let _ = p.send(TAG_ABORT, why.as_bytes());
            }
        }
        links.failed = Some(why.clone());
        Error::Distributed(why)
    }

    /// The error of link `k` (rank 0: to rank `k + 1`; others: to rank 0).
    fn link_failure(&self, k: usize, e: LinkError) -> String {
        let peer = if self.rank == 0 { k + 1 } else { 0 };
        match e {
            // Rank 0's reports already name the rank that failed.
            LinkError::Abort(why) if self.rank != 0 => why,
            LinkError::Abort(why) => format!("rank {peer} failed: {why}"),
            LinkError::Timeout => format!(
                "rank {peer} sent nothing for {} s (the watchdog timeout, {TIMEOUT_ENV}): it \
                 is stuck or gone",
                match self.rank {
                    0 => self.timeout.as_secs(),
                    _ => self.root_wait().as_secs(),
                }
            ),
            LinkError::Closed(why) => {
                format!("rank {peer} stopped without a word (its connection: {why})")
            }
        }
    }

    /// Rank 0 receives every other rank's payload (in rank order, its own first); the
    /// others send theirs and get `None`.
    fn gather_bytes(&self, local: Vec<u8>) -> Result<Option<Vec<Vec<u8>>>> {
        let mut links = self.links()?;
        if self.rank != 0 {
            if let Err(e) = links.peers[0].send(TAG_DATA, &local) {
                let why = self.link_failure(0, LinkError::Closed(e));
                return Err(self.fail(&mut links, why));
            }
            return Ok(None);
        }
        let mut all = Vec::with_capacity(self.world);
        all.push(local);
        for k in 0..links.peers.len() {
            match links.peers[k].recv(self.timeout) {
                Ok((_, p)) => all.push(p),
                Err(e) => {
                    let why = self.link_failure(k, e);
                    return Err(self.fail(&mut links, why));
                }
            }
        }
        Ok(Some(all))
    }

    /// Rank 0 sends `value` to every rank; every rank returns it.
    fn broadcast_bytes(&self, value: Vec<u8>) -> Result<Vec<u8>> {
        let mut links = self.links()?;
        if self.rank == 0 {
            for k in 0..links.peers.len() {
                if let Err(e) = links.peers[k].send(TAG_DATA, &value) {
                    let why = self.link_failure(k, LinkError::Closed(e));
                    return Err(self.fail(&mut links, why));
                }
            }
            return Ok(value);
        }
        match links.peers[0].recv(self.root_wait()) {
            Ok((_, p)) => Ok(p),
            Err(e) => {
                let why = self.link_failure(0, e);
                Err(self.fail(&mut links, why))
            }
        }
    }

    /// Rank 0's `value` on every rank (the others' argument is ignored).
    pub fn broadcast(&self, value: &[u8]) -> Result<Vec<u8>> {
        if self.world == 1 {
            return Ok(value.to_vec());
        }
        self.broadcast_bytes(if self.rank == 0 {
            value.to_vec()
        } else {
            Vec::new()
        })
    }

    /// Every rank's `local` values, in rank order, on every rank.
    pub fn all_gather(&self, local: &[f64]) -> Result<Vec<Vec<f64>>> {
        let parts = self.all_gather_bytes(bytemuck::cast_slice::<f64, u8>(local).to_vec())?;
        parts
            .iter()
            .map(|p| match p.len() % 8 {
                0 => Ok(bytemuck::pod_collect_to_vec(p)),
                _ => Err(Error::Distributed("rank 0 sent a malformed gather".into())),
            })
            .collect()
    }

    /// Every rank's `local` bytes, in rank order, on every rank.
    pub fn all_gather_bytes(&self, local: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        if self.world == 1 {
            return Ok(vec![local]);
        }
        let packed = match self.gather_bytes(local)? {
            Some(all) => {
                let mut out = Vec::new();
                for part in &all {
                    out.extend_from_slice(&(part.len() as u64).to_le_bytes());
                    out.extend_from_slice(part);
                }
                out
            }
            None => Vec::new(),
        };
        let packed = self.broadcast_bytes(packed)?;
        unpack_parts(&packed, self.world)
    }

    /// Sums `x` over the ranks in place: rank 0 adds the ranks' values in rank order
    /// (`((x₀ + x₁) + x₂) + …`) and every rank gets the result's bits.
    pub fn all_reduce_sum<F: Float>(&self, x: &mut [F]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let bytes = bytemuck::cast_slice::<F, u8>(x).to_vec();
        let bytes_of_sum = bytes.len();
        let summed = match self.gather_bytes(bytes)? {
            Some(all) => {
                let mut acc = x.to_vec();
                for (k, part) in all.iter().enumerate().skip(1) {
                    // Checked in bytes: a part of a few bytes short would otherwise be
                    // padded with zeros into the right number of values.
                    if part.len() != bytes_of_sum {
                        let mut links = self.links()?;
                        let why = format!(
                            "rank {k} contributed {} bytes to a sum of {} values of {} bytes \
                             (the ranks run different models)",
                            part.len(),
                            acc.len(),
                            std::mem::size_of::<F>()
                        );
                        return Err(self.fail(&mut links, why));
                    }
                    let part: Vec<F> = bytemuck::pod_collect_to_vec(part);
                    for (a, b) in acc.iter_mut().zip(part) {
                        *a += b;
                    }
                }
                bytemuck::cast_slice::<F, u8>(&acc).to_vec()
            }
            None => Vec::new(),
        };
        let summed = self.broadcast_bytes(summed)?;
        if summed.len() != bytes_of_sum {
            return Err(Error::Distributed(format!(
                "rank 0 sent {} bytes for a sum of {} values of {} bytes",
                summed.len(),
                x.len(),
                std::mem::size_of::<F>()
            )));
        }
        x.copy_from_slice(&bytemuck::pod_collect_to_vec::<u8, F>(&summed));
        Ok(())
    }

    /// Waits until every rank has reached this call.
    pub fn barrier(&self) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        self.gather_bytes(Vec::new())?;
        self.broadcast_bytes(Vec::new()).map(drop)
    }

    /// Reports this rank's failure `why` to the job (rank 0 tells every other rank, another
    /// rank tells rank 0, which passes it on), so the others stop with an error naming this
    /// rank instead of waiting for it. Best effort: a link already broken is ignored.
    pub fn abort(&self, why: &str) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if links.failed.is_some() {
            return;
        }
        let text = format!("rank {} failed: {why}", self.rank);
        for p in links.peers.iter_mut() {
            let _ = p.send(TAG_ABORT, text.as_bytes());
        }
        links.failed = Some(text);
    }
}

/// Splits `[len u64][bytes]…` into `world` byte vectors.
fn unpack_parts(packed: &[u8], world: usize) -> Result<Vec<Vec<u8>>> {
    let corrupt = || Error::Distributed("rank 0 sent a malformed gather".into());
    let mut out = Vec::with_capacity(world);
    let mut at = 0usize;
    while at < packed.len() {
        let head: [u8; 8] = packed
            .get(at..at + 8)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(corrupt)?;
        let len = usize::try_from(u64::from_le_bytes(head)).map_err(|_| corrupt())?;
        let end = len.checked_add(at + 8).ok_or_else(corrupt)?;
        out.push(packed.get(at + 8..end).ok_or_else(corrupt)?.to_vec());
        at = end;
    }
    if out.len() != world {
        return Err(corrupt());
    }
    Ok(out)
}

/// Rank 0's side of the rendezvous: accepts `world − 1` greetings on `port` within `wait`,
/// each from a distinct rank of the same world size. A connection that is not a rank (no
/// greeting within [`GREETING_WAIT`], or another one) is told why, dropped and noted on
/// stderr; a rank of another launch (world size, rank number, a rank claimed twice) stops
/// the rendezvous.
fn accept_ranks(world: usize, port: u16, wait: Duration) -> Result<Vec<Box<dyn Link>>> {
    let deadline = Instant::now() + wait;
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
        Error::Distributed(format!(
            "rank 0 cannot listen on port {port} for the rendezvous: {e} (set {}=PORT, the \
             same on every rank, to a free port)",
            crate::dist::launch::RENDEZVOUS_PORT_ENV
        ))
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Distributed(format!("rendezvous socket: {e}")))?;
    let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
    while slots.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((mut stream, from)) => {
                stream
                    .set_nonblocking(false)
                    .map_err(|e| Error::Distributed(format!("rendezvous socket: {e}")))?;
                let _ = stream.set_nodelay(true);
                match read_hello(&mut stream, world) {
                    // The answer tells the rank it reached mgkd-train's rank 0 (and not some
                    // other service on the port, such as torchrun's store).
                    Ok(k) if slots[k - 1].is_none() => match stream.send(TAG_DATA, HELLO) {
                        Ok(()) => slots[k - 1] = Some(stream),
                        Err(e) => {
                            return Err(Error::Distributed(format!(
                                "rank {k} ({from}) left during the rendezvous: {e}"
                            )))
                        }
                    },
                    Ok(k) => {
                        let why = format!("two processes claim rank {k} (the second from {from})");
                        let _ = stream.send(TAG_ABORT, why.as_bytes());
                        return Err(Error::Distributed(why));
                    }
                    // Not a rank (a port scan, a health check, another program): told why,
                    // dropped, and the rendezvous goes on.
                    Err(Refusal::Stranger(why)) => {
                        let _ = stream.send(TAG_ABORT, why.as_bytes());
                        crate::noteln!("rendezvous: ignored a connection from {from}: {why}");
                    }
                    // A rank of another launch: the job is misconfigured, stop it.
                    Err(Refusal::Misfit(why)) => {
                        let _ = stream.send(TAG_ABORT, why.as_bytes());
                        for s in slots.iter_mut().flatten() {
                            let _ = s.send(TAG_ABORT, why.as_bytes());
                        }
                        return Err(Error::Distributed(format!("{from}: {why}")));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = slots
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.is_none())
                        .map(|(k, _)| (k + 1).to_string())
                        .collect();
                    let why = format!(
                        "rank{} {} did not arrive at the rendezvous on port {port} within {} s \
                         ({RENDEZVOUS_TIMEOUT_ENV})",
                        if missing.len() > 1 { "s" } else { "" },
                        missing.join(", "),
                        wait.as_secs()
                    );
                    for s in slots.iter_mut().flatten() {
                        let _ = s.send(TAG_ABORT, why.as_bytes());
                    }
                    return Err(Error::Distributed(why));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(Error::Distributed(format!("rendezvous accept: {e}"))),
        }
    }
    Ok(slots
        .into_iter()
        .flatten()
        .map(|s| Box::new(s) as Box<dyn Link>)
        .collect())
}

/// Why rank 0 refuses a connection at the rendezvous.
#[derive(Debug)]
enum Refusal {
    /// Not an mgkd-train rank (no greeting, or another one): dropped.
    Stranger(String),
    /// An mgkd-train rank of another launch (world size, rank number): fatal.
    Misfit(String),
}

/// Seconds rank 0 waits for a new connection's greeting (a rank sends it at once).
const GREETING_WAIT: Duration = Duration::from_secs(10);

/// Reads a greeting `[HELLO][rank u32][world u32]`; the rank, or why it is refused.
fn read_hello(stream: &mut TcpStream, world: usize) -> std::result::Result<usize, Refusal> {
    let _ = stream.set_read_timeout(Some(GREETING_WAIT));
    let mut buf = [0u8; 16];
    stream.read_exact(&mut buf).map_err(|e| {
        Refusal::Stranger(format!("a connection that did not greet as a rank ({e})"))
    })?;
    if &buf[..8] != HELLO {
        return Err(Refusal::Stranger(
            "a connection that is not an mgkd-train rank (wrong greeting)".into(),
        ));
    }
    let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]) as usize;
    let (k, w) = (word(8), word(12));
    if w != world {
        return Err(Refusal::Misfit(format!(
            "rank {k} was launched with a world size of {w}, rank 0 with {world}"
        )));
    }
    if k == 0 || k >= world {
        return Err(Refusal::Misfit(format!(
            "a greeting from rank {k} in a world of {world}"
        )));
    }
    Ok(k)
}

/// Seconds a rank waits for rank 0's answer to its greeting (rank 0 answers at once).
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// Reads rank 0's answer to a greeting: the frame `[TAG_DATA][8][HELLO]`, or a refusal
/// (`TAG_ABORT` with its reason). Anything else comes from a service that is not
/// mgkd-train's rank 0; its bytes are not taken as a frame length.
fn read_answer(s: &mut TcpStream) -> std::result::Result<(), String> {
    let _ = s.set_read_timeout(Some(ANSWER_WAIT));
    let stranger = |what: String| {
        format!(
            "is not mgkd-train's rank 0 ({what}): another service holds the port; under \
             torchrun its agent's store holds MASTER_PORT, which is why the rendezvous uses \
             the next port there. Set {}=PORT (the same on every rank) to a free port",
            crate::dist::launch::RENDEZVOUS_PORT_ENV
        )
    };
    let mut head = [0u8; 9];
    s.read_exact(&mut head)
        .map_err(|e| stranger(format!("no answer to the greeting: {e}")))?;
    let len = u64::from_le_bytes(head[1..].try_into().unwrap_or_default());
    match (head[0], len) {
        (TAG_DATA, 8) => {
            let mut word = [0u8; 8];
            s.read_exact(&mut word)
                .map_err(|e| stranger(format!("a cut answer: {e}")))?;
            if &word == HELLO {
                Ok(())
            } else {
                Err(stranger("a wrong answer".into()))
            }
        }
        (TAG_ABORT, 1..=65536) => {
            let mut why = vec![0u8; len as usize];
            s.read_exact(&mut why)
                .map_err(|e| stranger(format!("a cut answer: {e}")))?;
            Err(format!(
                "refused this rank: {}",
                String::from_utf8_lossy(&why)
            ))
        }
        _ => Err(stranger("a wrong answer".into())),
    }
}

/// A rank's side of the rendezvous: connects to `addr:port` (retrying for `wait`) and greets
/// rank 0.
fn connect_to_root(
    rank: usize,
    world: usize,
    addr: &str,
    port: u16,
    wait: Duration,
) -> Result<Box<dyn Link>> {
    let deadline = Instant::now() + wait;
    let mut last = String::from("no attempt");
    loop {
        let targets: Vec<SocketAddr> = match (addr, port).to_socket_addrs() {
            Ok(t) => t.collect(),
            Err(e) => {
                last = format!("cannot resolve {addr}: {e}");
                Vec::new()
            }
        };
        for t in targets {
            match TcpStream::connect_timeout(&t, Duration::from_secs(5)) {
                Ok(mut s) => {
                    let _ = s.set_nodelay(true);
                    let mut hello = HELLO.to_vec();
                    hello.extend_from_slice(&(rank as u32).to_le_bytes());
                    hello.extend_from_slice(&(world as u32).to_le_bytes());
                    s.write_all(&hello).map_err(|e| {
                        Error::Distributed(format!("rank {rank}: greeting rank 0 at {t}: {e}"))
                    })?;
                    read_answer(&mut s).map_err(|why| {
                        Error::Distributed(format!(
                            "rank {rank}: {addr}:{port} (MASTER_ADDR and the rendezvous \
                             port) {why}"
                        ))
                    })?;
                    return Ok(Box::new(s));
                }
                Err(e) => last = format!("{t}: {e}"),
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Distributed(format!(
                "rank {rank} could not reach rank 0 at {addr}:{port} (MASTER_ADDR, the \
                 rendezvous port) within {} s ({RENDEZVOUS_TIMEOUT_ENV}): {last}",
                wait.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A backend's device communicator attached to a [`Comm`] ([`Comm::attach`]): released
/// when this guard drops, before the backend (and its CUDA context) goes.
#[derive(Debug)]
pub struct Attached<'a>(&'a Comm);

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.0.device_slot().take();
    }
}

impl Comm {
    /// Joins `be` to this job ([`crate::backend::Backend::attach_comm`]: NCCL on CUDA,
    /// nothing on the CPU); every rank calls it. Keep the guard while `be` trains.
    /// Every rank must run on the same kind of device (the collectives of a CPU rank and a
    /// CUDA rank do not meet): a job whose ranks differ stops on every rank with an error
    /// naming the first rank that differs from rank 0.
    pub fn attach<B: crate::backend::Backend>(&self, be: &B) -> Result<Attached<'_>> {
        if self.joined {
            let names = self.all_gather_bytes(be.name().into_bytes())?;
            let names: Vec<String> = names
                .iter()
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect();
            // "cuda:3 NVIDIA H200 (sm_90)" is of kind "cuda"; "cpu-f32" of "cpu-f32".
            let kind = |n: &str| n.split(':').next().unwrap_or_default().to_string();
            if let Some((k, other)) = names
                .iter()
                .enumerate()
                .find(|(_, n)| kind(n) != kind(&names[0]))
            {
                return Err(Error::Distributed(format!(
                    "rank {k} runs on {other} and rank 0 on {}: every rank of a job must run \
                     on the same kind of device (with --device auto, a rank whose GPU cannot \
                     be used runs on the CPU; --device cuda makes that an error naming the \
                     GPU)",
                    names[0]
                )));
            }
            be.attach_comm(self)?;
        }
        Ok(Attached(self))
    }

    /// This process's part in the job its launcher describes ([`crate::dist::Launch`]), met
    /// at the rendezvous; a solo process without launcher variables. Ranks other than 0
    /// stop printing notes (rank 0 speaks for the job); `auto` takes CUDA device
    /// `LOCAL_RANK`. Timeouts from [`RENDEZVOUS_TIMEOUT_ENV`] and [`TIMEOUT_ENV`].
    pub fn join_job() -> Result<Comm> {
        let Some(l) = crate::dist::Launch::from_env()? else {
            return Ok(Comm::solo());
        };
        let wait = seconds_from_env(RENDEZVOUS_TIMEOUT_ENV, DEFAULT_RENDEZVOUS_TIMEOUT_S)?;
        let timeout = seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)?;
        if l.rank != 0 {
            crate::io::stdout::silence_notes();
        }
        // One GPU per process: LOCAL_RANK's, or the only one a process sees when the
        // launcher bound one to each (Slurm's --gpus-per-task=1, CUDA_VISIBLE_DEVICES).
        let gpu = match crate::backend::device::cuda_device_count() {
            Ok(1) => 0,
            _ => l.local_rank,
        };
        crate::backend::device::auto_device(gpu);
        let comm = Comm::rendezvous(
            l.rank,
            l.world_size,
            &l.master_addr,
            l.master_port,
            wait,
            timeout,
        )?;
        crate::noteln!(
            "data-parallel: {} rank{} ({} variables), rendezvous at {}:{}",
            l.world_size,
            if l.world_size == 1 { "" } else { "s" },
            l.launcher,
            l.master_addr,
            l.master_port
        );
        Ok(comm)
    }
}
