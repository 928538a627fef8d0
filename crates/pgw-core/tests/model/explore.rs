//! A small exhaustive explorer: depth-first over every state reachable within a number of
//! transitions, each state expanded once per remaining depth (by a 64-bit fingerprint; a state
//! met again with more steps left is expanded again, so the search is complete up to the
//! bound), every safety property checked on every state, and liveness checked from every state
//! where the bounded run stops. A violation comes back with its path from the start.
//!
//! Why our own rather than stateright: the model is ours either way (stateright would run the
//! same `next` function); this keeps CI free of 47 more crates, keeps memory at one
//! fingerprint per state (a depth-first stack instead of a frontier of whole states), and
//! checks liveness the way the property is stated ("once faults stop, a primary comes back")
//! by running a fair, fault-free continuation from every state where the run stops, which
//! stateright's `eventually` (checked only on terminal paths) does not.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

pub trait Model {
    type State: Clone + Hash + Debug;
    fn init(&self) -> Vec<(String, Self::State)>;
    /// Every transition enabled in `s`, each with a label a person can read.
    fn next(&self, s: &Self::State, out: &mut Vec<(String, Self::State)>);
    /// Safety: `Err(which property, why)` when `s` breaks one.
    fn safety(&self, s: &Self::State) -> Result<(), String>;
    /// Liveness from `s`: `Err(why)` when the fault-free continuation does not recover.
    fn liveness(&self, s: &Self::State) -> Result<(), String>;
    /// A short description of a state for traces.
    fn show(&self, s: &Self::State) -> String;
}

pub fn fingerprint<T: Hash>(t: &T) -> u64 {
    let mut h = DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

#[derive(Debug)]
pub struct Found {
    pub property: String,
    /// Labels and state summaries from the start to the bad state.
    pub trace: Vec<(String, String)>,
}

impl Found {
    pub fn render(&self) -> String {
        let mut s = format!("counterexample: {}\n", self.property);
        for (i, (label, state)) in self.trace.iter().enumerate() {
            s.push_str(&format!("{i:>3}. {label}\n       {state}\n"));
        }
        s
    }
}

#[derive(Debug, Default)]
pub struct Report {
    /// Distinct states reached.
    pub states: usize,
    /// Transitions taken (including into states seen before).
    pub transitions: usize,
    /// Longest path explored.
    pub depth: usize,
    pub liveness_checked: usize,
    pub elapsed: Duration,
    pub found: Option<Found>,
}

struct Search<'a, M: Model> {
    m: &'a M,
    max_depth: usize,
    live: bool,
    /// fingerprint -> most steps that were left when it was expanded
    seen: HashMap<u64, usize>,
    path: Vec<(String, M::State)>,
    report: Report,
}

impl<M: Model> Search<'_, M> {
    fn visit(&mut self, label: String, s: M::State, depth: usize) -> bool {
        let left = self.max_depth - depth;
        let fp = fingerprint(&s);
        match self.seen.get(&fp) {
            Some(&l) if l >= left => return false,
            _ => {}
        }
        self.seen.insert(fp, left);
        self.report.depth = self.report.depth.max(depth);
        let bad = self.m.safety(&s).err().or_else(|| {
            if self.live && left == 0 {
                self.report.liveness_checked += 1;
                self.m.liveness(&s).err().map(|e| format!("liveness: {e}"))
            } else {
                None
            }
        });
        self.path.push((label, s));
        if let Some(property) = bad {
            self.report.found = Some(Found {
                property,
                trace: self
                    .path
                    .iter()
                    .map(|(l, s)| (l.clone(), self.m.show(s)))
                    .collect(),
            });
            return true;
        }
        if left > 0 {
            let mut out = Vec::new();
            let cur = &self.path.last().expect("just pushed").1;
            self.m.next(cur, &mut out);
            for (l, n) in out {
                self.report.transitions += 1;
                if self.visit(l, n, depth + 1) {
                    return true;
                }
            }
        }
        self.path.pop();
        false
    }
}

/// Explores every path of up to `max_depth` transitions from the initial states, stopping at
/// the first violation.
pub fn explore<M: Model>(m: &M, max_depth: usize, live: bool) -> Report {
    let t0 = Instant::now();
    let mut search = Search {
        m,
        max_depth,
        live,
        seen: HashMap::new(),
        path: Vec::new(),
        report: Report::default(),
    };
    for (label, s) in m.init() {
        if search.visit(format!("start: {label}"), s, 0) {
            break;
        }
        if std::env::var_os("PGW_MODEL_VERBOSE").is_some() {
            eprintln!("{} states, {:.1?}", search.seen.len(), t0.elapsed());
        }
    }
    let mut report = search.report;
    report.states = search.seen.len();
    report.elapsed = t0.elapsed();
    report
}
