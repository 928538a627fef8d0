//! A userspace Ethernet switch that delays frames: the bed's stand-in for `tc netem`, which this
//! kernel does not have (`CONFIG_NET_SCH_NETEM` is off; `tc qdisc add ... netem` answers
//! "Specified qdisc kind is unknown").
//!
//! While latency is on, the bed takes its switch ports out of the bridge and this switch forwards
//! between them: one packet socket per port (`AF_PACKET`, with `PACKET_VNET_HDR` so the kernel's
//! segmentation and checksum offload metadata travels with each frame), MAC learning, flooding of
//! unknown and broadcast destinations, the bed's cut rules, and per link a delay of
//! `delay ± jitter` drawn uniformly per frame. Frames of one link never overtake each other.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Blocked;

/// (from port, to port) -> Some((delay, jitter)) to delay that link, None to forward at once.
pub type DelayFn = Arc<dyn Fn(usize, usize) -> Option<(Duration, Duration)> + Send + Sync>;

const ETH_P_ALL: u16 = 0x0003;
const SOL_PACKET: i32 = 263;
const PACKET_VNET_HDR: i32 = 15;
const PACKET_IGNORE_OUTGOING: i32 = 23;
const VNET_HDR: usize = 10;

struct Frame {
    due: Instant,
    seq: u64,
    out: usize,
    data: Vec<u8>,
}
impl PartialEq for Frame {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Frame {}
impl PartialOrd for Frame {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Frame {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

struct Shared {
    fds: Vec<OwnedFd>,
    stop: AtomicBool,
    queue: Mutex<BinaryHeap<Reverse<Frame>>>,
    wake: Condvar,
    macs: Mutex<HashMap<[u8; 6], usize>>,
    last_due: Mutex<HashMap<(usize, usize), Instant>>,
    seq: AtomicU64,
    frames: AtomicU64,
    send_errors: AtomicU64,
    last_error: Mutex<String>,
    delay: DelayFn,
    blocked: Blocked,
}

pub struct DelaySwitch {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

fn check(rc: i32, what: &str) -> std::io::Result<()> {
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// Opens a packet socket bound to interface `name` (in the calling thread's namespace).
fn open_port(name: &str) -> std::io::Result<OwnedFd> {
    let proto = ETH_P_ALL.to_be();
    // SAFETY: plain socket(2) call; the fd is owned right after.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
    check(fd, "socket(AF_PACKET)")?;
    // SAFETY: fd is a fresh, valid descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: i32 = 1;
    for (opt, what) in [
        (PACKET_VNET_HDR, "PACKET_VNET_HDR"),
        (PACKET_IGNORE_OUTGOING, "PACKET_IGNORE_OUTGOING"),
    ] {
        // SAFETY: setsockopt with a pointer to a live i32 and its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                SOL_PACKET,
                opt,
                &one as *const i32 as *const libc::c_void,
                std::mem::size_of::<i32>() as u32,
            )
        };
        check(rc, what)?;
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: setsockopt with a pointer to a live timeval and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    check(rc, "SO_RCVTIMEO")?;
    let cname = CString::new(name).map_err(|_| std::io::Error::other("bad interface name"))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::other(format!("no interface {name}")));
    }
    // SAFETY: an all-zero sockaddr_ll is valid; the fields we need are set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: bind with a pointer to a live sockaddr_ll and its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    check(rc, &format!("bind to {name}"))?;
    Ok(fd)
}

impl DelaySwitch {
    /// Starts forwarding between `ports` (interfaces in namespace `ns`, already out of any bridge).
    pub fn start(
        ns: &str,
        ports: &[String],
        delay: DelayFn,
        blocked: Blocked,
    ) -> std::io::Result<DelaySwitch> {
        // Packet sockets belong to the namespace of the thread that creates them.
        let ns2 = ns.to_string();
        let names = ports.to_vec();
        let fds = std::thread::spawn(move || {
            super::enter_ns(&ns2);
            names
                .iter()
                .map(|n| open_port(n))
                .collect::<std::io::Result<Vec<OwnedFd>>>()
        })
        .join()
        .map_err(|_| std::io::Error::other("namespace thread panicked"))??;
        let shared = Arc::new(Shared {
            fds,
            stop: AtomicBool::new(false),
            queue: Mutex::new(BinaryHeap::new()),
            wake: Condvar::new(),
            macs: Mutex::new(HashMap::new()),
            last_due: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            last_error: Mutex::new(String::new()),
            delay,
            blocked,
        });
        let mut threads = Vec::new();
        for port in 0..ports.len() {
            let s = shared.clone();
            threads.push(std::thread::spawn(move || receive(&s, port)));
        }
        let s = shared.clone();
        threads.push(std::thread::spawn(move || transmit(&s)));
        Ok(DelaySwitch { shared, threads })
    }

    pub fn frames(&self) -> u64 {
        self.shared.frames.load(Ordering::Relaxed)
    }

    /// Frames the kernel refused to send, and the last refusal.
    pub fn send_errors(&self) -> (u64, String) {
        (
            self.shared.send_errors.load(Ordering::Relaxed),
            self.shared.last_error.lock().expect("last_error").clone(),
        )
    }

    /// Stops forwarding; frames still queued are dropped (like a link going away).
    pub fn stop(self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn send(s: &Shared, out: usize, data: &[u8]) {
    // SAFETY: send(2) from a live buffer on a socket we own.
    let rc = unsafe {
        libc::send(
            s.fds[out].as_raw_fd(),
            data.as_ptr() as *const libc::c_void,
            data.len(),
            0,
        )
    };
    if rc < 0 {
        // A lost frame, as on a real link; counted so a broken switch shows.
        s.send_errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut g) = s.last_error.lock() {
            *g = format!("{} ({} bytes)", std::io::Error::last_os_error(), data.len());
        }
    }
}

fn receive(s: &Shared, port: usize) {
    let mut buf = vec![0u8; 65536 + VNET_HDR + 64];
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15 ^ ((port as u64 + 1) << 17) ^ super::seed();
    let n_ports = s.fds.len();
    while !s.stop.load(Ordering::Relaxed) {
        // SAFETY: recv(2) into a live buffer of the given length.
        let n = unsafe {
            libc::recv(
                s.fds[port].as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < (VNET_HDR + 14) as isize {
            continue;
        }
        let frame = &buf[..n as usize];
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&frame[VNET_HDR..VNET_HDR + 6]);
        let mut src = [0u8; 6];
        src.copy_from_slice(&frame[VNET_HDR + 6..VNET_HDR + 12]);
        let known = {
            let mut m = s.macs.lock().expect("macs");
            if src[0] & 1 == 0 {
                m.insert(src, port);
            }
            if dst[0] & 1 == 0 {
                m.get(&dst).copied()
            } else {
                None
            }
        };
        let outs: Vec<usize> = match known {
            Some(o) if o != port => vec![o],
            Some(_) => continue,
            None => (0..n_ports).filter(|o| *o != port).collect(),
        };
        let blocked = s.blocked.lock().expect("blocked").clone();
        for out in outs {
            if blocked.contains(&(port, out)) {
                continue;
            }
            s.frames.fetch_add(1, Ordering::Relaxed);
            match (s.delay)(port, out) {
                None => send(s, out, frame),
                Some((d, j)) => {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let j_us = j.as_micros() as u64;
                    let d_us = d.as_micros() as u64;
                    let span = 2 * j_us + 1;
                    let us = (d_us + rng % span).saturating_sub(j_us);
                    let mut due = Instant::now() + Duration::from_micros(us);
                    {
                        let mut last = s.last_due.lock().expect("last_due");
                        let l = last.entry((port, out)).or_insert(due);
                        if *l > due {
                            due = *l;
                        }
                        *l = due;
                    }
                    let seq = s.seq.fetch_add(1, Ordering::Relaxed);
                    s.queue.lock().expect("queue").push(Reverse(Frame {
                        due,
                        seq,
                        out,
                        data: frame.to_vec(),
                    }));
                    s.wake.notify_one();
                }
            }
        }
    }
}

fn transmit(s: &Shared) {
    let mut q = s.queue.lock().expect("queue");
    while !s.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait = match q.peek() {
            Some(Reverse(f)) if f.due <= now => {
                let Some(Reverse(f)) = q.pop() else {
                    continue;
                };
                drop(q);
                send(s, f.out, &f.data);
                q = s.queue.lock().expect("queue");
                continue;
            }
            Some(Reverse(f)) => f.due - now,
            None => Duration::from_millis(50),
        };
        q = s
            .wake
            .wait_timeout(q, wait.min(Duration::from_millis(50)))
            .expect("queue")
            .0;
    }
}
