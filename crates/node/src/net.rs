//! Everything libp2p. One [`EventLoop`] owns the `Swarm`; the rest of the
//! peer talks to it through a cloneable [`Client`] (commands with oneshot
//! replies) and receives [`Event`]s on a bounded channel. The loop ends
//! when every `Client` is dropped or `shutdown` fires.
//!
//! Discovery: bootstrap addresses are dialed once the listeners are up;
//! mDNS finds LAN peers (fast at start, then every 20 s, not the default
//! five minutes), dialed up to a bound; identify feeds listen addresses into Kademlia, which runs in
//! server mode. Jobs are announced over gossipsub. Pulls and results travel
//! on one long-lived stream per worker slot and master (`libp2p-stream`,
//! messages framed by `antnest_proto::frame::Frames`); modules, and pulls when a stream
//! cannot be had, by request-response with the cbor codec's wire format
//! (our reader and writer, see [`codec`]) and raised size limits.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::transport::upgrade::Version;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, Transport, gossipsub, identify, identity, kad, mdns,
    noise, pnet, tcp, yamux,
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use antnest_proto::control::PeerInfo;
use antnest_proto::msg::{JOBS_TOPIC, PROTOCOL, STREAM_PROTOCOL};
use antnest_proto::{Announce, Request, Response};

pub mod accept;
pub mod codec;

/// How often Kademlia looks for peers again (a query to a few known
/// peers) while it knows fewer than a bucket's worth of them (20), and
/// once it knows more: each look asks up to 20 peers for 20 addresses
/// each, which every 5 s cost each of 100 peers tens of KB/s.
const KAD_REBOOTSTRAP_FEW: Duration = Duration::from_secs(5);
const KAD_REBOOTSTRAP_MANY: Duration = Duration::from_secs(60);

/// Peers known at most before masters heard of only through gossip are
/// no longer noted (each announcing master's key is one more entry).
const MAX_KNOWN_FROM_GOSSIP: usize = 4096;

/// How often mDNS asks the LAN who is there, once started (a peer asks at
/// 0.5 s, 1 s, 2 s, ... up to this after it starts, so a newcomer finds
/// the others at once; they learn of it when it dials them). Every peer
/// answers every query to the whole LAN: queries every 2 s cost each of
/// 100 peers about 350 KB/s of answers.
const MDNS_QUERY_EVERY: Duration = Duration::from_secs(20);
/// How long an mDNS answer holds: a few queries' time.
const MDNS_TTL: Duration = Duration::from_secs(65);
/// A peer dials peers it finds by mDNS only while it has fewer connections
/// than this: enough for the gossip mesh that carries announcements
/// (gossipsub keeps 6 to 12 mesh peers), with the masters a worker pulls
/// from dialed besides (their addresses come with their announcements).
/// Others may still dial it, up to [`MAX_CONNECTIONS`].
const DIAL_DISCOVERED_BELOW: usize = 24;

/// How the swarm is set up.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    /// Zero-config LAN discovery.
    pub mdns: bool,
    /// Pre-shared key: peers without it cannot connect (private mesh).
    pub psk: Option<pnet::PreSharedKey>,
    /// How long one request may take, including a module fetch.
    pub request_timeout: Duration,
    /// This peer's identity; `None`: a fresh one each start.
    pub keypair: Option<identity::Keypair>,
    /// QUIC beside TCP (on the same port numbers, UDP). Never with a
    /// mesh key: the pre-shared key covers TCP connections only.
    pub quic: bool,
    /// Serve as a relay (circuit relay v2) for peers that cannot be
    /// reached directly.
    pub relay_server: bool,
    /// Relays to hold a reservation on: this peer can be reached through
    /// them (and then directly, after hole punching).
    pub relays: Vec<Multiaddr>,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            listen: vec!["/ip4/0.0.0.0/tcp/0".parse().expect("valid multiaddr")],
            bootstrap: Vec::new(),
            mdns: true,
            psk: None,
            request_timeout: Duration::from_secs(120),
            keypair: None,
            quic: true,
            relay_server: false,
            relays: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    #[error("network setup: {0}")]
    Setup(String),
    #[error("request to {peer} failed: {reason}")]
    Request { peer: PeerId, reason: String },
    #[error("the network event loop has stopped")]
    Stopped,
    #[error("stream to {peer}: {reason}")]
    Stream { peer: PeerId, reason: String },
}

/// Connections a peer keeps at most: established in all, established with
/// one peer (a dial each way may cross), and incoming ones still being set
/// up (a stranger opening many at once waits).
const MAX_CONNECTIONS: u32 = 512;
const MAX_CONNECTIONS_PER_PEER: u32 = 4;
const MAX_PENDING_INCOMING: u32 = 64;
/// No new connections while the process uses more than this share of the
/// machine's memory.
const MAX_MEMORY_SHARE: f64 = 0.9;

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: libp2p::connection_limits::Behaviour,
    memory: libp2p::memory_connection_limits::Behaviour,
    /// A connection whose pings fail is closed, so a vanished peer's
    /// taskunits are re-issued without waiting for TCP to notice.
    ping: libp2p::ping::Behaviour,
    identify: identify::Behaviour,
    /// Reservations on relays, and connections through them.
    relay_client: libp2p::relay::client::Behaviour,
    /// Serving as a relay (`--relay`).
    relay: Toggle<libp2p::relay::Behaviour>,
    /// Hole punching: a connection through a relay is upgraded to a direct
    /// one when both sides can dial each other at once.
    dcutr: libp2p::dcutr::Behaviour,
    /// Whether this peer's addresses are reachable from outside (other
    /// peers dial them back), so that only those are advertised.
    autonat: libp2p::autonat::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    rr: request_response::Behaviour<codec::Codec>,
    streams: libp2p_stream::Behaviour,
}

/// What the network tells the peer.
#[derive(Debug)]
pub enum Event {
    InboundRequest {
        peer: PeerId,
        request: Request,
        channel: ResponseChannel<Response>,
    },
    Announced {
        from: PeerId,
        announce: Announce,
    },
    /// The last connection to this peer closed.
    PeerGone(PeerId),
}

#[derive(Debug)]
enum Command {
    Request {
        peer: PeerId,
        request: Request,
        reply: oneshot::Sender<Result<Response, NetError>>,
    },
    Respond {
        channel: ResponseChannel<Response>,
        response: Response,
    },
    Publish(Box<Announce>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
}

/// The handle to the network. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
    local: PeerId,
    /// Opens and accepts long-lived streams; the swarm behind it stays in
    /// the [`EventLoop`].
    streams: libp2p_stream::Control,
    /// libp2p's own metrics (connections, identify, Kademlia, gossipsub,
    /// ping), which the [`EventLoop`] records.
    metrics: std::sync::Arc<libp2p::metrics::Registry>,
}

/// How long opening a task stream may take, dial included.
const OPEN_STREAM_TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    /// A new long-lived stream to `peer` for exchanges framed by
    /// [`antnest_proto::frame::Frames`].
    /// Fails after [`OPEN_STREAM_TIMEOUT`] (a peer that went away may
    /// otherwise be dialed for as long as its addresses are tried).
    pub async fn open_stream(&self, peer: PeerId) -> Result<libp2p::Stream, NetError> {
        let mut control = self.streams.clone();
        let open = control.open_stream(peer, StreamProtocol::new(STREAM_PROTOCOL));
        match tokio::time::timeout(OPEN_STREAM_TIMEOUT, open).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(NetError::Stream {
                peer,
                reason: e.to_string(),
            }),
            Err(_) => Err(NetError::Stream {
                peer,
                reason: format!("not open after {OPEN_STREAM_TIMEOUT:?}"),
            }),
        }
    }

    /// The streams other peers open to this one. Only one caller may
    /// accept them.
    pub fn accept_streams(&self) -> Result<libp2p_stream::IncomingStreams, NetError> {
        self.streams
            .clone()
            .accept(StreamProtocol::new(STREAM_PROTOCOL))
            .map_err(|e| NetError::Setup(e.to_string()))
    }

    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    /// libp2p's metrics in Prometheus' text format (OpenMetrics).
    pub fn libp2p_metrics(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.metrics);
        text
    }

    /// Send a request and wait for its response.
    pub async fn request(&self, peer: PeerId, request: Request) -> Result<Response, NetError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Request {
                peer,
                request,
                reply,
            })
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    pub async fn respond(&self, channel: ResponseChannel<Response>, response: Response) {
        let _ = self.tx.send(Command::Respond { channel, response }).await;
    }

    /// Gossip a job announcement (best effort), with this peer's
    /// addresses in it.
    pub async fn announce(&self, announce: Announce) {
        let _ = self.tx.send(Command::Publish(Box::new(announce))).await;
    }

    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NetError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Peers(tx))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }
}

/// Owns the swarm. Run it with [`EventLoop::run`].
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    topic: gossipsub::IdentTopic,
    pending: HashMap<OutboundRequestId, oneshot::Sender<Result<Response, NetError>>>,
    listen_addrs: Vec<Multiaddr>,
    known: HashMap<PeerId, HashSet<Multiaddr>>,
    /// Connected peers reached over loopback: on this host, so their
    /// loopback addresses are theirs (another host's are not).
    on_this_host: HashSet<PeerId>,
    agents: HashMap<PeerId, String>,
    /// Dialed once the listeners are up (see [`EventLoop::run`]).
    bootstrap: Vec<Multiaddr>,
    /// Relays to hold a reservation on (see [`EventLoop::reserve`]): those
    /// told (`--relay-via`), and those found while behind a NAT (see
    /// [`EventLoop::relay_found`]); and the reservations held, by their
    /// listener.
    relays: Vec<Multiaddr>,
    /// Relays met (their identify lists the relay protocol), at an address
    /// of theirs, to reserve on if this peer turns out to be behind a NAT.
    relays_met: Vec<Multiaddr>,
    /// AutoNAT found this peer's addresses unreachable from outside.
    nat_private: bool,
    reservations: HashMap<libp2p::core::transport::ListenerId, PeerId>,
    /// Serving as a relay: its listen addresses (but loopback ones) are
    /// taken as its public ones, which reservations carry.
    relay_server: bool,
    /// How each peer was reached: through a relay first, and whether it is
    /// connected directly now (after hole punching, or from the start).
    reached: HashMap<PeerId, Reach>,
    /// Departures not yet told to the peer: the event channel was full
    /// (see [`EventLoop::emit`]).
    departed: std::collections::VecDeque<PeerId>,
    /// libp2p's metrics, recorded from the swarm's events.
    metrics: libp2p::metrics::Metrics,
    /// Bytes of job announcements published here, and delivered here
    /// (each once: gossipsub drops duplicates before they reach us).
    announced_sent: Counter,
    announced_received: Counter,
}

fn setup_err(e: impl std::fmt::Display) -> NetError {
    NetError::Setup(e.to_string())
}

fn build_transport(
    key: &identity::Keypair,
    psk: Option<pnet::PreSharedKey>,
    quic: bool,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, NetError> {
    let tcp = build_tcp(key, psk)?;
    if !quic || psk.is_some() {
        return Ok(tcp);
    }
    let quic = libp2p::quic::tokio::Transport::new(libp2p::quic::Config::new(key))
        .map(|(peer, conn), _| (peer, StreamMuxerBox::new(conn)));
    Ok(tcp
        .or_transport(quic)
        .map(|either, _| either.into_inner())
        .boxed())
}

fn build_tcp(
    key: &identity::Keypair,
    psk: Option<pnet::PreSharedKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, NetError> {
    let noise = noise::Config::new(key).map_err(setup_err)?;
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    Ok(match psk {
        Some(psk) => tcp
            .and_then(move |socket, _| pnet::PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(Duration::from_secs(20))
            .boxed(),
        None => tcp
            .upgrade(Version::V1)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(Duration::from_secs(20))
            .boxed(),
    })
}

/// Build the swarm and start listening. Returns the handle, the event
/// stream and the loop to spawn.
pub fn new(config: NetConfig) -> Result<(Client, mpsc::Receiver<Event>, EventLoop), NetError> {
    let key = config
        .keypair
        .clone()
        .unwrap_or_else(identity::Keypair::generate_ed25519);
    let local = key.public().to_peer_id();
    let quic = config.quic && config.psk.is_none();
    let transport = build_transport(&key, config.psk, quic)?;
    let mdns_enabled = config.mdns;
    let relay_server = config.relay_server;
    let request_timeout = config.request_timeout;
    // libp2p's metrics; gossipsub records its own in it (bytes per topic:
    // what announcements cost).
    let mut registry = libp2p::metrics::Registry::default();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|_| transport)
        .map_err(setup_err)?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(setup_err)?
        .with_behaviour(|key, relay_client| {
            let peer_id = key.public().to_peer_id();
            let mdns = if mdns_enabled {
                let cfg = mdns::Config {
                    query_interval: MDNS_QUERY_EVERY,
                    ttl: MDNS_TTL,
                    ..Default::default()
                };
                Some(mdns::tokio::Behaviour::new(cfg, peer_id)?)
            } else {
                None
            };
            let mut kad_cfg = kad::Config::new(StreamProtocol::new("/antnest/kad/1"));
            // Bootstrapped by hand once a first peer is identified, and again
            // every few seconds while few peers are known (see
            // `EventLoop::run`): peers that join through the same bootstrap
            // peer at the same moment may each ask it before it knows the
            // other, and would never meet otherwise.
            kad_cfg.set_periodic_bootstrap_interval(None);
            let mut kad = kad::Behaviour::with_config(
                peer_id,
                kad::store::MemoryStore::new(peer_id),
                kad_cfg,
            );
            kad.set_mode(Some(kad::Mode::Server));
            let gossip_cfg = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .max_transmit_size(64 * 1024)
                .validation_mode(gossipsub::ValidationMode::Strict)
                .build()
                .map_err(|e| e.to_string())?;
            let gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_cfg,
            )?
            .with_metrics(
                registry.sub_registry_with_prefix("gossipsub"),
                Default::default(),
            );
            let rr = request_response::Behaviour::with_codec(
                codec::Codec::default(),
                [(StreamProtocol::new(PROTOCOL), ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(request_timeout),
            );
            let limits = libp2p::connection_limits::ConnectionLimits::default()
                .with_max_established(Some(MAX_CONNECTIONS))
                .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
                .with_max_pending_incoming(Some(MAX_PENDING_INCOMING));
            Ok(Behaviour {
                limits: libp2p::connection_limits::Behaviour::new(limits),
                memory: libp2p::memory_connection_limits::Behaviour::with_max_percentage(
                    MAX_MEMORY_SHARE,
                ),
                ping: libp2p::ping::Behaviour::new(libp2p::ping::Config::new()),
                // A listen address that appears later (a new interface, or
                // a listener slower than `wait_listening`'s wait) is pushed
                // to connected peers, so they can tell others where we are.
                identify: identify::Behaviour::new(
                    identify::Config::new("/antnest/1".into(), key.public())
                        .with_agent_version(format!("antnest/{}", env!("CARGO_PKG_VERSION")))
                        .with_push_listen_addr_updates(true),
                ),
                relay_client,
                relay: relay_server
                    .then(|| libp2p::relay::Behaviour::new(peer_id, Default::default()))
                    .into(),
                dcutr: libp2p::dcutr::Behaviour::new(peer_id),
                autonat: libp2p::autonat::Behaviour::new(peer_id, Default::default()),
                mdns: mdns.into(),
                kad,
                gossipsub,
                rr,
                streams: libp2p_stream::Behaviour::new(),
            })
        })
        .map_err(setup_err)?
        .with_swarm_config(|c| {
            // A stream opened for one protocol (every request has its own
            // stream) sends its request with the protocol's name instead of
            // waiting a round trip for the listener to confirm it; the wire
            // format is multistream-select's own, so any peer understands.
            c.with_idle_connection_timeout(Duration::from_secs(300))
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();

    let streams = swarm.behaviour().streams.new_control();
    let topic = gossipsub::IdentTopic::new(JOBS_TOPIC);
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&topic)
        .map_err(setup_err)?;
    for addr in listen_addrs(&config.listen, quic) {
        swarm.listen_on(addr).map_err(setup_err)?;
    }
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let (ev_tx, ev_rx) = mpsc::channel(256);
    let metrics = libp2p::metrics::Metrics::new(&mut registry);
    let (announced_sent, announced_received) = (Counter::default(), Counter::default());
    registry.register(
        "antnest_announcement_bytes_sent",
        "Bytes of job announcements this peer published.",
        announced_sent.clone(),
    );
    registry.register(
        "antnest_announcement_bytes_received",
        "Bytes of job announcements delivered to this peer, each once (duplicates are dropped before).",
        announced_received.clone(),
    );
    Ok((
        Client {
            tx: cmd_tx,
            local,
            streams,
            metrics: std::sync::Arc::new(registry),
        },
        ev_rx,
        EventLoop {
            swarm,
            commands: cmd_rx,
            events: ev_tx,
            topic,
            pending: HashMap::new(),
            listen_addrs: Vec::new(),
            known: HashMap::new(),
            on_this_host: HashSet::new(),
            agents: HashMap::new(),
            bootstrap: config.bootstrap,
            relays: config.relays,
            reservations: HashMap::new(),
            relays_met: Vec::new(),
            nat_private: false,
            relay_server: config.relay_server,
            reached: HashMap::new(),
            departed: Default::default(),
            metrics,
            announced_sent,
            announced_received,
        },
    ))
}

impl EventLoop {
    /// Wait until the swarm listens on every configured address (so the
    /// caller can print them), at most `timeout`.
    pub async fn wait_listening(&mut self, expected: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.listen_addrs.len() < expected {
            tokio::select! {
                ev = self.swarm.select_next_some() => self.handle_swarm_event(ev).await,
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
        // A listener on every interface (0.0.0.0) reports an address per
        // interface, one by one: the others come right after the first.
        let settled = Duration::from_millis(100);
        let mut quiet = tokio::time::Instant::now() + settled;
        loop {
            let had = self.listen_addrs.len();
            tokio::select! {
                ev = self.swarm.select_next_some() => self.handle_swarm_event(ev).await,
                _ = tokio::time::sleep_until(quiet.min(deadline)) => return,
            }
            if self.listen_addrs.len() > had {
                quiet = tokio::time::Instant::now() + settled;
            }
        }
    }

    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen_addrs
    }

    /// Dial the bootstrap peers, then serve until `shutdown`.
    ///
    /// The dials wait for this point, after [`EventLoop::wait_listening`],
    /// so that identify tells the bootstrap peer where we listen: a peer
    /// that dials before its listener is up identifies itself with no
    /// address, and the bootstrap peer cannot point others to it.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        for addr in std::mem::take(&mut self.bootstrap) {
            if let Err(e) = self.swarm.dial(addr.clone()) {
                warn!(%addr, "cannot dial bootstrap peer: {e}");
            }
        }
        for relay in self.relays.clone() {
            if let Err(e) = self.swarm.dial(relay.clone()) {
                warn!(%relay, "cannot dial relay: {e}");
            }
        }
        tokio::pin!(shutdown);
        let mut rebootstrap = tokio::time::interval(KAD_REBOOTSTRAP_FEW);
        let mut last_bootstrap = tokio::time::Instant::now();
        // Waits for room for a held-back departure without borrowing `self`.
        let events = self.events.clone();
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                ev = self.swarm.select_next_some() => self.handle_swarm_event(ev).await,
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.handle_command(cmd),
                    None => break,
                },
                _ = rebootstrap.tick() => {
                    self.reserve(true);
                    let kad = &mut self.swarm.behaviour_mut().kad;
                    let known: usize = kad.kbuckets().map(|b| b.num_entries()).sum();
                    let every = if known < 20 { KAD_REBOOTSTRAP_FEW } else { KAD_REBOOTSTRAP_MANY };
                    if known > 0 && last_bootstrap.elapsed() >= every {
                        let _ = kad.bootstrap();
                        last_bootstrap = tokio::time::Instant::now();
                    }
                }
                room = events.reserve(), if !self.departed.is_empty() => {
                    if let (Ok(room), Some(peer)) = (room, self.departed.pop_front()) {
                        room.send(Event::PeerGone(peer));
                    }
                }
            }
        }
        debug!("network event loop stopped");
    }

    fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::Request {
                peer,
                request,
                reply,
            } => {
                let id = self.swarm.behaviour_mut().rr.send_request(&peer, request);
                self.pending.insert(id, reply);
            }
            Command::Respond { channel, response } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .rr
                    .send_response(channel, response)
                    .is_err()
                {
                    debug!("response dropped: the requester went away");
                }
            }
            Command::Publish(mut announce) => {
                announce.addrs = self
                    .advertised()
                    .take(antnest_proto::msg::MAX_ANNOUNCED_ADDRS)
                    .map(|a| a.to_vec().into())
                    .collect();
                let bytes =
                    cbor4ii::serde::to_vec(Vec::new(), &*announce).expect("announce encodes");
                let topic = self.topic.clone();
                let len = bytes.len() as u64;
                if let Err(e) = self.swarm.behaviour_mut().gossipsub.publish(topic, bytes) {
                    // InsufficientPeers just means nobody is around yet.
                    debug!("announce not published: {e}");
                } else {
                    self.announced_sent.inc_by(len);
                }
            }
            Command::Peers(reply) => {
                let connected: HashSet<PeerId> = self.swarm.connected_peers().copied().collect();
                let mut ids: Vec<PeerId> =
                    self.known.keys().chain(connected.iter()).copied().collect();
                ids.sort();
                ids.dedup();
                let peers = ids
                    .into_iter()
                    .map(|p| PeerInfo {
                        peer_id: p.to_string(),
                        addresses: self
                            .known
                            .get(&p)
                            .map(|a| a.iter().map(|a| a.to_string()).collect())
                            .unwrap_or_default(),
                        connected: connected.contains(&p),
                        agent: self.agents.get(&p).cloned(),
                        via: self.reached.get(&p).map(|r| r.to_string()),
                    })
                    .collect();
                let _ = reply.send(peers);
            }
        }
    }

    /// Hold a reservation on each relay this peer is connected to and has
    /// none on: it makes this peer reachable at the relay's address
    /// (`.../p2p/RELAY/p2p-circuit/p2p/US`), announced like any other.
    /// Only over an established connection: a reservation asked for while
    /// the first dial is under way may ride a connection that is then
    /// closed as a duplicate, and end at once. With `redial`, relays not
    /// connected are dialed (a relay that went away, or restarted).
    fn reserve(&mut self, redial: bool) {
        use libp2p::multiaddr::Protocol;
        for relay in self.relays.clone() {
            let Some(Protocol::P2p(id)) = relay.iter().last() else {
                continue;
            };
            if self.reservations.values().any(|r| *r == id) {
                continue;
            }
            if !self.swarm.is_connected(&id) {
                if redial {
                    let _ = self.swarm.dial(relay.clone());
                }
                continue;
            }
            match self
                .swarm
                .listen_on(relay.clone().with(Protocol::P2pCircuit))
            {
                Ok(listener) => {
                    self.reservations.insert(listener, id);
                }
                Err(e) => warn!(%relay, "cannot reserve on relay: {e}"),
            }
        }
    }

    /// Whether this peer is, as far as it can tell, behind a NAT: AutoNAT
    /// found it unreachable, or it listens on no global address at all.
    fn behind_nat(&self) -> bool {
        self.nat_private || !self.listen_addrs.iter().any(is_global)
    }

    /// Relay `peer` was met at `addrs`: noted, and reserved on while this
    /// peer is behind a NAT (at most [`MAX_RELAYS_FOUND`] found ones).
    fn relay_found(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
        use libp2p::multiaddr::Protocol;
        let Some(addr) = addrs.iter().find(|a| !is_loopback(a) && !is_relayed(a)) else {
            return;
        };
        // With the relay's id once (a bootstrap address carries it already).
        let mut addr = addr.clone();
        if !matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
            addr.push(Protocol::P2p(peer));
        }
        if self.relays_met.len() < MAX_RELAYS_FOUND && !self.relays_met.contains(&addr) {
            self.relays_met.push(addr);
        }
        self.use_relays_met();
    }

    /// Behind a NAT: reserve on the relays met, too.
    fn use_relays_met(&mut self) {
        if !self.behind_nat() {
            return;
        }
        for addr in self.relays_met.clone() {
            if !self.relays.contains(&addr) {
                info!(relay = %addr, "behind a NAT: reserving on a relay found");
                self.relays.push(addr);
            }
        }
        self.reserve(false);
    }

    /// The listen addresses other hosts may reach: all but loopback ones,
    /// unless this peer listens on nothing else.
    fn advertised(&self) -> impl Iterator<Item = &Multiaddr> {
        let routable = self.listen_addrs.iter().any(|a| !is_loopback(a));
        self.listen_addrs
            .iter()
            .filter(move |a| !routable || !is_loopback(a))
    }

    fn learn(&mut self, peer: PeerId, addr: Multiaddr) {
        self.swarm
            .behaviour_mut()
            .kad
            .add_address(&peer, addr.clone());
        self.known.entry(peer).or_default().insert(addr);
    }

    /// Hand `event` to the peer without ever waiting for room. The loop
    /// must go on taking commands: the peer answers a request by a command,
    /// and a loop waiting for room in the event channel while the peer
    /// waits for room in the command channel would hold both forever. So
    /// when the channel is full, a request is refused at once (its sender
    /// backs off and asks again), an announcement is dropped (it is
    /// repeated every half second), and a departure waits in `departed`.
    fn emit(&mut self, event: Event) {
        use tokio::sync::mpsc::error::TrySendError;
        match self.events.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Closed(_)) => debug!("event dropped: nobody listens"),
            Err(TrySendError::Full(Event::InboundRequest { peer, channel, .. })) => {
                debug!(%peer, "busy: request refused");
                let busy = Response::Refused("busy: ask again".into());
                let _ = self.swarm.behaviour_mut().rr.send_response(channel, busy);
            }
            Err(TrySendError::Full(Event::Announced { from, .. })) => {
                debug!(%from, "busy: announcement dropped");
            }
            Err(TrySendError::Full(Event::PeerGone(peer))) => {
                // Once per peer: it is told as soon as there is room.
                if !self.departed.contains(&peer) {
                    self.departed.push_back(peer);
                }
            }
        }
    }

    /// Count `event` in libp2p's metrics.
    fn record(&self, event: &SwarmEvent<BehaviourEvent>) {
        use libp2p::metrics::Recorder;
        self.metrics.record(event);
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => self.metrics.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.metrics.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => self.metrics.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => self.metrics.record(e),
            _ => {}
        }
    }

    async fn handle_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.record(&event);
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                if self.relay_server && !is_loopback(&address) && !is_relayed(&address) {
                    self.swarm.add_external_address(address.clone());
                }
                self.listen_addrs.push(address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                debug!(%peer_id, "connected");
                let relayed = endpoint.is_relayed();
                let reach = self.reached.entry(peer_id).or_insert(Reach {
                    relayed_first: relayed,
                    direct: false,
                });
                reach.direct |= !relayed;
                if relayed {
                    info!(%peer_id, "connected through a relay");
                } else if reach.relayed_first {
                    info!(%peer_id, "connected directly after a relayed connection");
                }
                if is_loopback(endpoint.get_remote_address()) {
                    self.on_this_host.insert(peer_id);
                }
                if endpoint.is_dialer() {
                    self.learn(peer_id, endpoint.get_remote_address().clone());
                }
                self.reserve(false);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                debug!(%peer_id, "disconnected");
                self.on_this_host.remove(&peer_id);
                // How it was reached is kept past the connection: a peer
                // reached through a relay and then directly may lose the
                // direct connection and dial the punched hole again.
                if self.reached.len() > MAX_KNOWN_FROM_GOSSIP {
                    let swarm = &self.swarm;
                    self.reached.retain(|p, _| swarm.is_connected(p));
                }
                self.emit(Event::PeerGone(peer_id));
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                // A relay's reservation ended: asked for again (see
                // `reserve`), and its address no longer announced.
                if let Some(relay) = self.reservations.remove(&listener_id) {
                    info!(%relay, ?reason, "relay reservation ended");
                }
                self.listen_addrs.retain(|a| !addresses.contains(a));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address);
            }
            SwarmEvent::ListenerError { error, .. } => warn!("listener failed: {error}"),
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(?peer_id, "dial failed: {error}");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    // Past the bound, a peer found is only noted: in
                    // Kademlia's table, its lookups would dial it.
                    let info = self.swarm.network_info();
                    let dialing = info.connection_counters().num_pending_outgoing() as usize;
                    if info.num_peers() + dialing >= DIAL_DISCOVERED_BELOW {
                        self.known.entry(peer).or_default().insert(addr);
                        continue;
                    }
                    self.learn(peer, addr.clone());
                    if peer != *self.swarm.local_peer_id() {
                        let opts = DialOpts::peer_id(peer)
                            .addresses(vec![addr])
                            .condition(PeerCondition::DisconnectedAndNotDialing)
                            .build();
                        let _ = self.swarm.dial(opts);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                debug!(%peer_id, addrs = info.listen_addrs.len(), "identified");
                self.agents.insert(peer_id, info.agent_version.clone());
                if info.protocols.iter().any(|p| p.as_ref() == RELAY_HOP) {
                    self.relay_found(peer_id, &info.listen_addrs);
                }
                // Only addresses another host can reach: a peer's loopback
                // addresses are of no use off its host.
                let here = self.on_this_host.contains(&peer_id);
                for addr in info.listen_addrs {
                    if here || !is_loopback(&addr) {
                        self.learn(peer_id, addr);
                    }
                }
                if self.known.len() == 1 {
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message,
                ..
            })) => {
                self.announced_received.inc_by(message.data.len() as u64);
                self.on_announcement(propagation_source, message);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rr(event)) => self.handle_rr(event).await,
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(event)) => {
                info!(?event, "relay client");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(event)) => {
                info!(?event, "hole punching");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(
                libp2p::autonat::Event::StatusChanged { new, .. },
            )) => {
                info!(?new, "reachability from outside");
                self.nat_private = new == libp2p::autonat::NatStatus::Private;
                self.use_relays_met();
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(libp2p::ping::Event {
                peer,
                connection,
                result: Err(libp2p::ping::Failure::Timeout),
            })) => {
                // (A peer without ping, `Unsupported`, is no reason.)
                debug!(%peer, "pings time out: connection closed");
                self.swarm.close_connection(connection);
            }
            _ => {}
        }
    }

    /// A job announcement from the gossip mesh: passed on to the peer if
    /// its signer is the job's master.
    fn on_announcement(&mut self, propagation_source: PeerId, message: gossipsub::Message) {
        match cbor4ii::serde::from_slice::<Announce>(&message.data) {
            // A job's master is the announcement's signer (gossipsub
            // checks the signature, `ValidationMode::Strict`): a peer
            // cannot announce a job in another master's name.
            Ok(announce)
                if message
                    .source
                    .is_some_and(|a| a.to_bytes() == announce.master) =>
            {
                let from = message.source.unwrap_or(propagation_source);
                // Reached through the gossip mesh: where the master
                // listens, so a pull can dial it.
                if !self.swarm.is_connected(&from)
                    && !self.known.contains_key(&from)
                    && self.known.len() < MAX_KNOWN_FROM_GOSSIP
                {
                    let addrs = announce
                        .addrs
                        .iter()
                        .take(antnest_proto::msg::MAX_ANNOUNCED_ADDRS);
                    for addr in addrs.filter_map(|a| Multiaddr::try_from(a.to_vec()).ok()) {
                        self.learn(from, addr);
                    }
                }
                self.emit(Event::Announced { from, announce });
            }
            Ok(_) => {
                debug!(%propagation_source, "announcement not signed by its master ignored")
            }
            Err(e) => debug!(%propagation_source, "malformed announcement ignored: {e}"),
        }
    }

    async fn handle_rr(&mut self, event: request_response::Event<Request, Response>) {
        use request_response::{Event as E, Message};
        match event {
            E::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                self.emit(Event::InboundRequest {
                    peer,
                    request,
                    channel,
                });
            }
            E::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            E::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            E::InboundFailure { peer, error, .. } => {
                debug!(%peer, "inbound request failed: {error}");
            }
            E::ResponseSent { .. } => {}
        }
    }
}

/// A task stream, read through a buffer: a slot waiting on it, or a master
/// holding a `Wait` on it, can look for the next bytes without taking them
/// (`fill_buf` is cancel-safe where a half-read message would be lost).
pub type TaskStream = futures::io::BufReader<libp2p::Stream>;

/// The peer id a master's book and the control socket know `peer` by.
pub fn id(peer: &PeerId) -> antnest_proto::PeerId {
    antnest_proto::PeerId::from_bytes(&peer.to_bytes()).expect("a libp2p peer id fits")
}

/// The libp2p peer id of `peer`, if it is one.
pub fn libp2p_id(peer: antnest_proto::PeerId) -> Option<PeerId> {
    PeerId::from_bytes(peer.as_bytes()).ok()
}

/// The addresses to listen on: `listen`, and with `quic` a QUIC address
/// beside each TCP one (the same port number, UDP).
pub fn listen_addrs(listen: &[Multiaddr], quic: bool) -> Vec<Multiaddr> {
    use libp2p::multiaddr::Protocol;
    let mut all = listen.to_vec();
    if quic {
        for addr in listen {
            let mut parts: Vec<Protocol> = addr.iter().collect();
            if let [_, Protocol::Tcp(port)] = parts.as_slice() {
                parts[1] = Protocol::Udp(*port);
                parts.push(Protocol::QuicV1);
                all.push(parts.into_iter().collect());
            }
        }
    }
    all
}

/// How a connected peer was reached.
#[derive(Debug, Clone, Copy)]
struct Reach {
    relayed_first: bool,
    direct: bool,
}

impl std::fmt::Display for Reach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match (self.relayed_first, self.direct) {
            (false, _) => "direct",
            (true, false) => "relay",
            (true, true) => "relay, then direct",
        })
    }
}

/// The protocol a relay serves reservations and circuits on.
const RELAY_HOP: &str = "/libp2p/circuit/relay/0.2.0/hop";
/// Relays found (not told) that a peer behind a NAT reserves on at most.
const MAX_RELAYS_FOUND: usize = 2;

/// Whether `addr` is on a global IP address (not loopback, private,
/// link-local, shared or unspecified): reachable from the internet if no
/// firewall is in the way.
fn is_global(addr: &Multiaddr) -> bool {
    use libp2p::multiaddr::Protocol;
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => {
            let shared = ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64;
            !(ip.is_private()
                || ip.is_loopback()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_documentation()
                || shared)
        }
        Some(Protocol::Ip6(ip)) => {
            let unique_local = (ip.segments()[0] & 0xfe00) == 0xfc00;
            let link_local = (ip.segments()[0] & 0xffc0) == 0xfe80;
            !(ip.is_loopback() || ip.is_unspecified() || unique_local || link_local)
        }
        _ => false,
    }
}

/// Whether `addr` goes through a relay.
fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit))
}

/// Whether `addr` is on the loopback interface (127.0.0.0/8 or ::1).
fn is_loopback(addr: &Multiaddr) -> bool {
    use libp2p::multiaddr::Protocol;
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => ip.is_loopback(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_internet_addresses_are_global() {
        let global = |a: &str| is_global(&a.parse().unwrap());
        assert!(global("/ip4/203.0.114.7/tcp/4001"));
        assert!(global("/ip6/2a01:4f8::1/tcp/4001"));
        for local in [
            "/ip4/127.0.0.1/tcp/1",
            "/ip4/10.1.2.3/tcp/1",
            "/ip4/172.16.0.1/tcp/1",
            "/ip4/192.168.1.2/tcp/1",
            "/ip4/169.254.0.1/tcp/1",
            "/ip4/100.64.0.1/tcp/1",
            "/ip4/0.0.0.0/tcp/1",
            "/ip4/203.0.113.7/tcp/1",
            "/ip6/::1/tcp/1",
            "/ip6/fd00::1/tcp/1",
            "/ip6/fe80::1/tcp/1",
        ] {
            assert!(!global(local), "{local}");
        }
    }

    #[test]
    fn quic_listens_beside_each_tcp_address() {
        let tcp: Multiaddr = "/ip4/0.0.0.0/tcp/4001".parse().unwrap();
        let all = listen_addrs(std::slice::from_ref(&tcp), true);
        assert_eq!(
            all,
            vec![
                tcp.clone(),
                "/ip4/0.0.0.0/udp/4001/quic-v1".parse().unwrap()
            ]
        );
        assert_eq!(listen_addrs(std::slice::from_ref(&tcp), false), vec![tcp]);
    }
}
