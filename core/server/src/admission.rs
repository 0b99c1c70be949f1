//! Who gets a connection, and who loses one: the HTTP server's admission decisions, without
//! I/O (the server in `server.rs` accepts, reads and cuts; this decides).
//!
//! Agents and API callers share one port, and a connection's class is known only once its
//! first request head arrives. So every accepted connection starts **waiting** (no request in
//! flight: new, or kept alive between requests) and is never refused at accept; the waiting
//! pool is bounded by evicting its oldest members, first those of the same source address:
//! a flood from one address only ever evicts its own connections, and an agent, which sends
//! its request the moment it connects, is never the oldest. When a request head arrives the
//! connection is **busy** in a class with its own cap: agents (`max_agent_connections`, never
//! taken by API traffic) or API callers (`max_connections` in total, `max_connections_per_ip`
//! per source address). An upgraded agent connection stays busy until it closes.
//!
//! A connection kept alive after an authenticated request (**trusted**) is evicted only when
//! its address (or the pool) has no other waiting connection to give: a flood from an
//! address never closes the idle keep-alive connection of a caller with a token behind the
//! same address, which would otherwise race its next request.
//!
//! Descriptors: [`budget`] derives the caps from the open-files limit, so that running out of
//! descriptors shrinks the API's share and never the agents'.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

/// One accepted connection's id; ids grow with acceptance, so a smaller id is older.
pub type ConnId = u64;

/// The caps (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// API requests in flight at once (busy API connections, SSE streams included).
    pub max_connections: usize,
    /// Connections waiting for a request at once (new or kept alive).
    pub max_waiting: usize,
    /// Per source address: waiting connections, and busy API connections.
    pub max_connections_per_ip: usize,
    /// Agent connections (the agent endpoint, upgraded or being checked).
    pub max_agent_connections: usize,
}

/// What a request is, as far as admission cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `GET /api/v1/agent/connect`.
    Agent,
    /// Any other route.
    Api,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the core holds {0} agent connections, its limit (api.max_agent_connections)")]
    AgentsFull(usize),
    #[error("the core is serving {0} API requests, its limit (api.max_connections)")]
    ApiFull(usize),
    #[error("this address has {0} API requests in flight, its limit (api.max_connections_per_ip)")]
    AddressFull(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    /// `in_flight` requests (more than one only for the moment between a response's end and
    /// its body's release, when the next request may already have begun).
    Busy {
        class: Class,
        in_flight: u32,
    },
    /// Upgraded (an agent's WebSocket): busy until it closes.
    Upgraded(Class),
}

#[derive(Debug)]
struct Conn {
    ip: IpAddr,
    state: State,
    /// Its last request carried a valid API token.
    trusted: bool,
}

/// Open connections by state, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub waiting: usize,
    pub api: usize,
    pub agents: usize,
}

/// The admission state of every open connection.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    next: ConnId,
    conns: HashMap<ConnId, Conn>,
    /// Waiting connections, oldest first.
    waiting: BTreeSet<ConnId>,
    waiting_by_ip: HashMap<IpAddr, BTreeSet<ConnId>>,
    api_by_ip: HashMap<IpAddr, usize>,
    api: usize,
    agents: usize,
}

/// A connection admitted at accept, and the ones to cut to make room for it.
#[derive(Debug, PartialEq, Eq)]
pub struct Accepted {
    pub id: ConnId,
    pub evict: Vec<ConnId>,
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Admission {
        Admission {
            limits,
            next: 0,
            conns: HashMap::new(),
            waiting: BTreeSet::new(),
            waiting_by_ip: HashMap::new(),
            api_by_ip: HashMap::new(),
            api: 0,
            agents: 0,
        }
    }

    pub fn limits(&self) -> AdmissionLimits {
        self.limits
    }

    pub fn counts(&self) -> Counts {
        Counts {
            waiting: self.waiting.len(),
            api: self.api,
            agents: self.agents,
        }
    }

    /// A connection from `ip` was accepted: it waits for its first request. Room is made by
    /// evicting the oldest waiting connection of the same address when that address is at
    /// its cap, else, when the pool is full, the oldest of the address holding most of it.
    pub fn accept(&mut self, ip: IpAddr) -> Accepted {
        let mut evict = Vec::new();
        let own = self.waiting_by_ip.get(&ip).map_or(0, BTreeSet::len);
        if own >= self.limits.max_connections_per_ip {
            evict.extend(self.oldest_waiting_of(ip));
        } else if self.waiting.len() >= self.limits.max_waiting {
            let greediest = self
                .waiting_by_ip
                .iter()
                .max_by_key(|(_, ids)| ids.len())
                .map(|(ip, _)| *ip);
            evict.extend(greediest.and_then(|ip| self.oldest_waiting_of(ip)));
        }
        for id in &evict {
            self.close(*id);
        }
        let id = self.next;
        self.next += 1;
        self.conns.insert(
            id,
            Conn {
                ip,
                state: State::Waiting,
                trusted: false,
            },
        );
        self.set_waiting(id, ip);
        Accepted { id, evict }
    }

    /// The oldest waiting connection of all, untrusted first (to free a descriptor when
    /// accept runs out).
    pub fn oldest_waiting(&self) -> Option<ConnId> {
        self.first_to_evict(&self.waiting)
    }

    fn oldest_waiting_of(&self, ip: IpAddr) -> Option<ConnId> {
        self.waiting_by_ip
            .get(&ip)
            .and_then(|ids| self.first_to_evict(ids))
    }

    /// The oldest untrusted connection of `ids` (oldest first), else the oldest trusted one.
    fn first_to_evict(&self, ids: &BTreeSet<ConnId>) -> Option<ConnId> {
        let trusted = |id: &ConnId| self.conns.get(id).is_some_and(|conn| conn.trusted);
        ids.iter()
            .find(|id| !trusted(id))
            .or_else(|| ids.first())
            .copied()
    }

    /// A request head arrived on `id`: admit it in `class`, or refuse it (the connection is
    /// then answered and closed).
    pub fn begin(&mut self, id: ConnId, class: Class) -> Result<(), Refusal> {
        let Some(conn) = self.conns.get_mut(&id) else {
            // Evicted while its head arrived: the connection is being cut anyway.
            return Err(Refusal::ApiFull(self.api));
        };
        let ip = conn.ip;
        match &mut conn.state {
            State::Waiting => {}
            State::Busy { in_flight, .. } => {
                // Already counted: the previous request's body is being released.
                *in_flight += 1;
                return Ok(());
            }
            State::Upgraded(_) => return Ok(()),
        }
        match class {
            Class::Agent => {
                if self.agents >= self.limits.max_agent_connections {
                    return Err(Refusal::AgentsFull(self.agents));
                }
                self.agents += 1;
            }
            Class::Api => {
                if self.api >= self.limits.max_connections {
                    return Err(Refusal::ApiFull(self.api));
                }
                let of_ip = self.api_by_ip.get(&ip).copied().unwrap_or(0);
                if of_ip >= self.limits.max_connections_per_ip {
                    return Err(Refusal::AddressFull(of_ip));
                }
                self.api += 1;
                *self.api_by_ip.entry(ip).or_insert(0) += 1;
            }
        }
        self.unset_waiting(id, ip);
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.state = State::Busy {
                class,
                in_flight: 1,
            };
        }
        Ok(())
    }

    /// The request on `id` was answered (its body sent or dropped). A connection that was
    /// upgraded (an agent's WebSocket) stays busy until it closes; any other waits again
    /// once no request is in flight, `trusted` when the request carried a valid token.
    pub fn finish(&mut self, id: ConnId, upgraded: bool, trusted: bool) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.trusted = trusted;
        let ip = conn.ip;
        let State::Busy { class, in_flight } = &mut conn.state else {
            return;
        };
        let class = *class;
        if upgraded {
            conn.state = State::Upgraded(class);
            return;
        }
        *in_flight -= 1;
        if *in_flight > 0 {
            return;
        }
        conn.state = State::Waiting;
        self.unset_busy(ip, class);
        self.set_waiting(id, ip);
    }

    /// The connection `id` is gone (closed, cut or evicted); unknown ids are ignored.
    pub fn close(&mut self, id: ConnId) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        match conn.state {
            State::Waiting => self.unset_waiting(id, conn.ip),
            State::Busy { class, .. } | State::Upgraded(class) => self.unset_busy(conn.ip, class),
        }
    }

    /// Whether `id` is an agent's connection (exempt from the connection lifetime bound).
    pub fn is_agent(&self, id: ConnId) -> bool {
        self.conns.get(&id).is_some_and(|conn| {
            matches!(
                conn.state,
                State::Busy {
                    class: Class::Agent,
                    ..
                } | State::Upgraded(Class::Agent)
            )
        })
    }

    fn set_waiting(&mut self, id: ConnId, ip: IpAddr) {
        self.waiting.insert(id);
        self.waiting_by_ip.entry(ip).or_default().insert(id);
    }

    fn unset_waiting(&mut self, id: ConnId, ip: IpAddr) {
        self.waiting.remove(&id);
        if let Some(ids) = self.waiting_by_ip.get_mut(&ip) {
            ids.remove(&id);
            if ids.is_empty() {
                self.waiting_by_ip.remove(&ip);
            }
        }
    }

    fn unset_busy(&mut self, ip: IpAddr, class: Class) {
        match class {
            Class::Agent => self.agents -= 1,
            Class::Api => {
                self.api -= 1;
                if let Some(count) = self.api_by_ip.get_mut(&ip) {
                    *count -= 1;
                    if *count == 0 {
                        self.api_by_ip.remove(&ip);
                    }
                }
            }
        }
    }
}

/// Descriptors kept for everything but client connections: the database pool, log and spool
/// files, git and provider child processes' pipes, registry and cloud API connections.
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// The caps that fit in `open_files` descriptors (the soft `RLIMIT_NOFILE`, already raised to
/// the hard limit): the configured ones when they fit; otherwise the agents' share is kept
/// (down to half of what is left) and the API's shrinks. `None` when not even a few
/// connections fit.
pub fn budget(open_files: u64, wanted: AdmissionLimits) -> Option<AdmissionLimits> {
    let usable = open_files.saturating_sub(RESERVED_DESCRIPTORS) as usize;
    if usable < 16 {
        return None;
    }
    let agents = wanted.max_agent_connections.min(usable / 2).max(1);
    let left = usable - agents;
    let api_wanted = wanted.max_connections + wanted.max_waiting;
    let (max_connections, max_waiting) = if api_wanted <= left {
        (wanted.max_connections, wanted.max_waiting)
    } else {
        // Scale both down in proportion, keeping at least one of each.
        let connections = (left * wanted.max_connections / api_wanted).max(1);
        (connections, (left - connections).max(1))
    };
    Some(AdmissionLimits {
        max_connections,
        max_waiting,
        max_connections_per_ip: wanted.max_connections_per_ip,
        max_agent_connections: agents,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> AdmissionLimits {
        AdmissionLimits {
            max_connections: 4,
            max_waiting: 6,
            max_connections_per_ip: 3,
            max_agent_connections: 2,
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    /// A caller with a token behind the flooding address (one NAT): its kept-alive
    /// connection is not cut while the flood has connections of its own to give up, so its
    /// next request does not race a close.
    #[test]
    fn a_trusted_keep_alive_connection_outlasts_a_flood_from_its_address() {
        let mut admission = Admission::new(limits());
        let caller = admission.accept(ip(9)).id;
        assert_eq!(admission.begin(caller, Class::Api), Ok(()));
        admission.finish(caller, false, true);
        for _ in 0..50 {
            let next = admission.accept(ip(9));
            assert!(!next.evict.contains(&caller), "{next:?}");
        }
        assert_eq!(
            admission.oldest_waiting().map(|id| id == caller),
            Some(false)
        );
        // Only trusted ones left to give: the oldest of them goes.
        let mut admission = Admission::new(limits());
        let trusted: Vec<_> = (0..3)
            .map(|_| {
                let id = admission.accept(ip(9)).id;
                admission.begin(id, Class::Api).unwrap();
                admission.finish(id, false, true);
                id
            })
            .collect();
        assert_eq!(admission.accept(ip(9)).evict, vec![trusted[0]]);
    }

    #[test]
    fn a_flood_from_one_address_evicts_only_its_own_oldest_waiting_connections() {
        let mut admission = Admission::new(limits());
        let victim = admission.accept(ip(200)).id;
        let flood: Vec<_> = (0..3).map(|_| admission.accept(ip(9)).id).collect();
        // The fourth from the flooding address evicts the flood's oldest, not the victim.
        let more = admission.accept(ip(9));
        assert_eq!(more.evict, vec![flood[0]]);
        for _ in 0..50 {
            let next = admission.accept(ip(9));
            assert!(!next.evict.contains(&victim), "{next:?}");
        }
        assert_eq!(admission.counts().waiting, 4);
        // The victim's request is still admitted.
        assert_eq!(admission.begin(victim, Class::Api), Ok(()));
    }

    #[test]
    fn an_agent_arriving_during_a_flood_from_its_own_address_gets_in() {
        let mut admission = Admission::new(limits());
        for _ in 0..10 {
            admission.accept(ip(1));
        }
        let agent = admission.accept(ip(1));
        // It is the newest: the next eviction takes an older one.
        let next = admission.accept(ip(1));
        assert!(!next.evict.contains(&agent.id));
        assert_eq!(admission.begin(agent.id, Class::Agent), Ok(()));
        // Busy agents are never evicted and do not count against the address.
        for _ in 0..10 {
            let next = admission.accept(ip(1));
            assert!(!next.evict.contains(&agent.id));
        }
        assert!(admission.is_agent(agent.id));
        assert_eq!(admission.counts().agents, 1);
    }

    #[test]
    fn a_full_pool_evicts_the_oldest_of_the_greediest_address() {
        let mut admission = Admission::new(limits());
        let a = admission.accept(ip(1)).id;
        let b: Vec<_> = (0..3).map(|_| admission.accept(ip(2)).id).collect();
        let c: Vec<_> = (0..2).map(|_| admission.accept(ip(3)).id).collect();
        assert_eq!(admission.counts().waiting, 6);
        let d = admission.accept(ip(4));
        assert_eq!(d.evict, vec![b[0]]);
        let _ = (a, c);
    }

    #[test]
    fn api_traffic_never_takes_the_agents_share_and_each_class_has_its_cap() {
        let mut admission = Admission::new(AdmissionLimits {
            max_connections_per_ip: 100,
            ..limits()
        });
        let api: Vec<_> = (0..5).map(|_| admission.accept(ip(1)).id).collect();
        for id in &api[..4] {
            assert_eq!(admission.begin(*id, Class::Api), Ok(()));
        }
        assert_eq!(
            admission.begin(api[4], Class::Api),
            Err(Refusal::ApiFull(4))
        );
        let agents: Vec<_> = (0..3).map(|_| admission.accept(ip(1)).id).collect();
        assert_eq!(admission.begin(agents[0], Class::Agent), Ok(()));
        assert_eq!(admission.begin(agents[1], Class::Agent), Ok(()));
        assert_eq!(
            admission.begin(agents[2], Class::Agent),
            Err(Refusal::AgentsFull(2))
        );
        // An answered API request waits again, and its slot is free for the next one.
        admission.finish(api[0], false, false);
        assert_eq!(admission.begin(api[4], Class::Api), Ok(()));
        // A request that begins before the previous one's body was released counts once.
        assert_eq!(admission.begin(api[4], Class::Api), Ok(()));
        admission.finish(api[4], false, false);
        assert_eq!(admission.counts().api, 4);
        // An upgraded agent stays busy after its 101.
        admission.finish(agents[0], true, false);
        assert!(admission.is_agent(agents[0]));
        admission.close(agents[0]);
        assert_eq!(admission.begin(agents[2], Class::Agent), Ok(()));
    }

    #[test]
    fn one_address_is_capped_in_requests_in_flight() {
        let mut admission = Admission::new(AdmissionLimits {
            max_connections: 100,
            max_waiting: 100,
            ..limits()
        });
        let ids: Vec<_> = (0..3).map(|_| admission.accept(ip(1)).id).collect();
        for id in &ids {
            assert_eq!(admission.begin(*id, Class::Api), Ok(()));
        }
        let fourth = admission.accept(ip(1)).id;
        assert_eq!(
            admission.begin(fourth, Class::Api),
            Err(Refusal::AddressFull(3))
        );
        // Another address is not affected.
        let other = admission.accept(ip(2)).id;
        assert_eq!(admission.begin(other, Class::Api), Ok(()));
        // Closing every connection leaves nothing counted.
        for id in ids.into_iter().chain([fourth, other]) {
            admission.close(id);
        }
        assert_eq!(admission.counts(), Counts::default());
        assert!(admission.waiting_by_ip.is_empty() && admission.api_by_ip.is_empty());
    }

    #[test]
    fn an_evicted_connection_is_refused_if_its_head_arrives_late() {
        let mut admission = Admission::new(limits());
        let first = admission.accept(ip(1)).id;
        for _ in 0..3 {
            admission.accept(ip(1));
        }
        assert!(admission.begin(first, Class::Api).is_err());
        admission.close(first);
        assert_eq!(admission.counts().waiting, 3);
    }

    #[test]
    fn the_budget_keeps_the_agents_share_when_descriptors_are_short() {
        let wanted = AdmissionLimits {
            max_connections: 1024,
            max_waiting: 1024,
            max_connections_per_ip: 256,
            max_agent_connections: 512,
        };
        // Plenty: unchanged.
        assert_eq!(budget(1 << 20, wanted), Some(wanted));
        // 1024 descriptors: 768 usable; agents keep 384 (half), the API shares the rest.
        let short = budget(1024, wanted).unwrap();
        assert_eq!(short.max_agent_connections, 384);
        assert_eq!(short.max_connections + short.max_waiting, 384);
        assert_eq!(short.max_connections, 192);
        // 2048: agents keep all 512 they asked for; the API gets what is left.
        let some = budget(2048, wanted).unwrap();
        assert_eq!(some.max_agent_connections, 512);
        assert_eq!(some.max_connections + some.max_waiting, 2048 - 256 - 512);
        assert_eq!(budget(200, wanted), None);
    }
}
