//! Playing EC2 for the `ec2` provider's end-to-end tests, with real parts:
//!
//! - [`MotoServer`]: moto's EC2 API server (PyPI `moto[server]`) on a free loopback port.
//! - [`FaultProxy`]: an HTTP proxy in front of moto that answers chosen RunInstances calls
//!   with EC2's own XML error (moto cannot inject errors) and forwards everything else.
//! - [`Network`]: a bridge with the host address 192.0.2.193/26; every booted instance gets
//!   a network namespace with a veth on it and its own 192.0.2.x address, so agents really
//!   dial the core across a network.
//! - [`Imds`]: the instance metadata service (IMDSv2: session tokens, then
//!   `spot/instance-action`), answering each instance by its source address.
//! - [`Hypervisor`]: watches moto for the instances the core launched, reads their
//!   user-data back through the API (`DescribeInstanceAttribute`), checks every launch
//!   (IMDSv2 required with hop limit 1, tags, terminate on shutdown, `cloud-init schema`),
//!   applies the user-data as cloud-init would (its files into a per-instance root, then the
//!   command the unit's `ExecStart` names, the image's agent binary) inside the instance's
//!   namespace; stops the agent when the instance is terminated in moto, and terminates the
//!   instance when its agent exits (the unit powers off; shutdown behaviour terminate).
//!
//! Networks use fixed addresses, so one harness runs at a time: [`Network::create`] holds a
//! process-wide lock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_ec2::Client;
use base64::Engine as _;
use tokio_util::sync::CancellationToken;

/// moto's x86_64 and arm64 AMIs (ECOSYSTEM.md).
pub const MOTO_AMI_AMD64: &str = "ami-04681a1dbd79675a5";
pub const MOTO_AMI_ARM64: &str = "ami-0e9271c829888680e";
/// The host's address on the test network: 192.0.2.192/26, a more specific route than a
/// machine's own 192.0.2.0/24 (this sandbox's eth0 is 192.0.2.2/24 with its gateway at .1,
/// which must never be shadowed).
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 193);
const PREFIX_LEN: u8 = 26;
/// Instances get 192.0.2.194 onwards.
const FIRST_INSTANCE: u8 = 194;
const MAX_INSTANCES: usize = 60;

fn moto_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("STAGELY_MOTO_SERVER") {
        return Some(path.into());
    }
    let venv = Path::new("/usr/local/lib/stagely/moto-venv/bin/moto_server");
    if venv.exists() {
        return Some(venv.into());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("moto_server"))
            .find(|path| path.exists())
    })
}

/// moto's server, killed on drop.
pub struct MotoServer {
    child: std::process::Child,
    pub url: String,
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl MotoServer {
    /// `None` (with a note) outside CI when moto is not installed; in CI that fails.
    pub async fn start() -> Option<MotoServer> {
        let Some(binary) = moto_binary() else {
            assert!(
                !crate::in_ci(),
                "moto_server is required in CI (scripts/setup.sh installs it)"
            );
            eprintln!("skipping: moto_server is not installed (run scripts/setup.sh)");
            return None;
        };
        let port = free_port("127.0.0.1");
        let child = std::process::Command::new(binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let moto = MotoServer {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Some(moto);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("moto_server did not listen on {port} within 20 s");
    }
}

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

/// An EC2 client for `url` with moto's static credentials.
pub fn ec2_client(url: &str) -> Client {
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new("us-east-1"))
        .endpoint_url(url)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "static",
        ))
        .build();
    Client::from_conf(config)
}

/// EC2's answer when a zone has no capacity for the request.
const CAPACITY_ERROR: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>InsufficientInstanceCapacity</Code><Message>We currently do not have sufficient capacity in the Availability Zone you requested.</Message></Error></Errors><RequestID>00000000-0000-4000-8000-000000000000</RequestID></Response>";

/// Forwards to moto, except the RunInstances calls it is told to refuse.
pub struct FaultProxy {
    pub url: String,
    /// While set, every spot RunInstances gets `InsufficientInstanceCapacity` (500).
    pub refuse_spot: Arc<AtomicBool>,
    /// How many calls were refused.
    pub refused: Arc<AtomicUsize>,
    /// RunInstances calls seen, spot or not (`true`: spot).
    pub launches: Arc<Mutex<Vec<bool>>>,
    stop: CancellationToken,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl FaultProxy {
    pub async fn start(upstream: &str) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let refuse_spot = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicUsize::new(0));
        let launches = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let state = ProxyState {
            upstream: upstream.to_string(),
            client: reqwest::Client::new(),
            refuse_spot: refuse_spot.clone(),
            refused: refused.clone(),
            launches: launches.clone(),
        };
        let app = axum::Router::new()
            .fallback(proxy)
            .with_state(Arc::new(state));
        let shutdown = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
        });
        FaultProxy {
            url,
            refuse_spot,
            refused,
            launches,
            stop,
        }
    }
}

struct ProxyState {
    upstream: String,
    client: reqwest::Client,
    refuse_spot: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    launches: Arc<Mutex<Vec<bool>>>,
}

async fn proxy(
    axum::extract::State(state): axum::extract::State<Arc<ProxyState>>,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 16 * 1024 * 1024).await else {
        return (axum::http::StatusCode::PAYLOAD_TOO_LARGE, "body too large").into_response();
    };
    let text = String::from_utf8_lossy(&body);
    if text.contains("Action=RunInstances") {
        let spot = text.contains("InstanceMarketOptions.MarketType=spot");
        if let Ok(mut launches) = state.launches.lock() {
            launches.push(spot);
        }
        if spot && state.refuse_spot.load(Ordering::SeqCst) {
            state.refused.fetch_add(1, Ordering::SeqCst);
            return (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                [(axum::http::header::CONTENT_TYPE, "text/xml")],
                CAPACITY_ERROR,
            )
                .into_response();
        }
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut forward = state
        .client
        .request(parts.method.clone(), format!("{}{path}", state.upstream))
        .body(body.to_vec());
    for (name, value) in &parts.headers {
        if name != axum::http::header::HOST && name != axum::http::header::CONTENT_LENGTH {
            forward = forward.header(name, value);
        }
    }
    match forward.send().await {
        Ok(response) => {
            let status = response.status();
            let headers = response.headers().clone();
            let bytes = response.bytes().await.unwrap_or_default();
            let mut answer = (status, bytes.to_vec()).into_response();
            for (name, value) in &headers {
                if name != axum::http::header::CONTENT_LENGTH
                    && name != axum::http::header::TRANSFER_ENCODING
                {
                    answer.headers_mut().insert(name.clone(), value.clone());
                }
            }
            answer
        }
        Err(error) => (axum::http::StatusCode::BAD_GATEWAY, error.to_string()).into_response(),
    }
}

static NETWORK_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|error| format!("ip {args:?}: {error}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether `name` is `stg<digits><tail>` with `tail` matching.
fn is_test_name(name: &str, tail: impl Fn(&str) -> bool) -> bool {
    name.strip_prefix("stg").is_some_and(|rest| {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        digits > 0 && tail(&rest[digits..])
    })
}

/// Deletes the bridges (`stg<pid>br`) and namespaces (`stg<pid>n<k>`) of earlier test networks.
fn remove_stale_networks() {
    let listed = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default()
    };
    for line in listed(&["-o", "link", "show", "type", "bridge"]).lines() {
        // "7: stg2618br: <BROADCAST,...> ..."
        if let Some(name) = line.split(": ").nth(1)
            && is_test_name(name, |tail| tail == "br")
        {
            let _ = ip(&["link", "del", name]);
        }
    }
    for line in listed(&["netns", "list"]).lines() {
        // "stg2618n0 (id: 1)"
        let name = line.split_whitespace().next().unwrap_or("");
        if is_test_name(name, |tail| {
            tail.strip_prefix('n')
                .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
        }) {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// The test network: a bridge holding [`HOST_IP`]; instances join it from their namespaces.
pub struct Network {
    bridge: String,
    prefix: String,
    next: AtomicUsize,
    _lock: tokio::sync::MutexGuard<'static, ()>,
}

impl Network {
    /// `None` (with a note) outside CI when network namespaces cannot be made here.
    pub async fn create() -> Option<Network> {
        let lock = NETWORK_LOCK.lock().await;
        let prefix = format!("stg{}", std::process::id() % 100_000);
        let bridge = format!("{prefix}br");
        // Only one test network exists at a time (this lock in a process, nextest's
        // `ec2-network` group across processes), so any other is what a killed test left
        // behind: its bridge would hold HOST_IP too and take the instances' traffic.
        remove_stale_networks();
        let made = ip(&["link", "add", &bridge, "type", "bridge"])
            .and_then(|()| {
                ip(&[
                    "addr",
                    "add",
                    &format!("{HOST_IP}/{PREFIX_LEN}"),
                    "dev",
                    &bridge,
                ])
            })
            .and_then(|()| ip(&["link", "set", &bridge, "up"]));
        if let Err(error) = made {
            let _ = ip(&["link", "del", &bridge]);
            assert!(!crate::in_ci(), "CI needs network namespaces: {error}");
            eprintln!("skipping: cannot make the test network: {error}");
            return None;
        }
        Some(Network {
            bridge,
            prefix,
            next: AtomicUsize::new(0),
            _lock: lock,
        })
    }

    /// A namespace with its own 192.0.2.x address on the bridge, and its name.
    fn host(&self) -> Result<(String, Ipv4Addr), String> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        if n >= MAX_INSTANCES {
            return Err("the test network is full".into());
        }
        let address = Ipv4Addr::new(192, 0, 2, FIRST_INSTANCE + n as u8);
        let namespace = format!("{}n{n}", self.prefix);
        let outside = format!("{}h{n}", self.prefix);
        let inside = format!("{}i{n}", self.prefix);
        ip(&["netns", "add", &namespace])?;
        ip(&[
            "link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", &namespace,
        ])?;
        ip(&["link", "set", &outside, "master", &self.bridge, "up"])?;
        ip(&[
            "-n",
            &namespace,
            "addr",
            "add",
            &format!("{address}/{PREFIX_LEN}"),
            "dev",
            &inside,
        ])?;
        ip(&["-n", &namespace, "link", "set", &inside, "up"])?;
        ip(&["-n", &namespace, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &namespace,
            "route",
            "add",
            "default",
            "via",
            &HOST_IP.to_string(),
        ])?;
        Ok((namespace, address))
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for n in 0..self.next.load(Ordering::SeqCst) {
            let _ = ip(&["netns", "del", &format!("{}n{n}", self.prefix)]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// What the metadata service knows.
#[derive(Default)]
struct ImdsState {
    /// Source address → instance id.
    instances: HashMap<IpAddr, String>,
    /// Tokens handed out → instance id.
    tokens: HashMap<String, String>,
    /// Instances with a pending spot interruption.
    interrupted: HashSet<String>,
    /// Token requests and notice reads, for assertions.
    token_requests: usize,
    notice_reads: usize,
}

/// IMDSv2 on the test network: `PUT /latest/api/token` (needs the TTL header), then reads
/// with `X-aws-ec2-metadata-token` (else 401); `spot/instance-action` is 404 until
/// [`Imds::interrupt`].
#[derive(Clone)]
pub struct Imds {
    pub url: String,
    state: Arc<Mutex<ImdsState>>,
    stop: CancellationToken,
}

impl Imds {
    pub async fn start() -> Imds {
        let listener = tokio::net::TcpListener::bind((HOST_IP, 0)).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(ImdsState::default()));
        let app = axum::Router::new()
            .route("/latest/api/token", axum::routing::put(imds_token))
            .route(
                "/latest/meta-data/spot/instance-action",
                axum::routing::get(imds_instance_action),
            )
            .with_state(state.clone());
        let stop = CancellationToken::new();
        let shutdown = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        });
        Imds { url, state, stop }
    }

    fn register(&self, address: Ipv4Addr, instance_id: &str) {
        self.state
            .lock()
            .unwrap()
            .instances
            .insert(IpAddr::V4(address), instance_id.to_string());
    }

    /// EC2 will reclaim `instance_id`: its `spot/instance-action` now answers.
    pub fn interrupt(&self, instance_id: &str) {
        self.state
            .lock()
            .unwrap()
            .interrupted
            .insert(instance_id.to_string());
    }

    /// (token requests, notice reads) so far.
    pub fn reads(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap();
        (state.token_requests, state.notice_reads)
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

async fn imds_token(
    axum::extract::State(state): axum::extract::State<Arc<Mutex<ImdsState>>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
) -> (axum::http::StatusCode, String) {
    if !headers.contains_key("x-aws-ec2-metadata-token-ttl-seconds") {
        return (axum::http::StatusCode::BAD_REQUEST, String::new());
    }
    let mut state = state.lock().unwrap();
    let Some(instance) = state.instances.get(&peer.ip()).cloned() else {
        return (axum::http::StatusCode::FORBIDDEN, String::new());
    };
    state.token_requests += 1;
    let token = format!("imds-{}", uuid::Uuid::new_v4().simple());
    state.tokens.insert(token.clone(), instance);
    (axum::http::StatusCode::OK, token)
}

async fn imds_instance_action(
    axum::extract::State(state): axum::extract::State<Arc<Mutex<ImdsState>>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
) -> (axum::http::StatusCode, String) {
    let mut state = state.lock().unwrap();
    let token = headers
        .get("x-aws-ec2-metadata-token")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let (Some(by_token), Some(by_address)) = (
        state.tokens.get(token).cloned(),
        state.instances.get(&peer.ip()).cloned(),
    ) else {
        return (axum::http::StatusCode::UNAUTHORIZED, String::new());
    };
    if by_token != by_address {
        return (axum::http::StatusCode::UNAUTHORIZED, String::new());
    }
    state.notice_reads += 1;
    if state.interrupted.contains(&by_address) {
        (
            axum::http::StatusCode::OK,
            r#"{"action": "terminate", "time": "2026-11-26T12:00:00Z"}"#.to_string(),
        )
    } else {
        (axum::http::StatusCode::NOT_FOUND, String::new())
    }
}

/// One launch as EC2 received it, checked the moment the harness saw it.
#[derive(Debug, Clone)]
pub struct Launch {
    pub instance_id: String,
    pub tags: BTreeMap<String, String>,
    pub spot: bool,
    pub http_tokens_required: bool,
    pub hop_limit: Option<i32>,
    pub terminate_on_shutdown: bool,
    pub image_id: String,
    /// `cloud-init schema` on the user-data: `Err` with its output when it failed.
    pub schema: Result<(), String>,
    pub user_data: String,
    /// Booted (an agent was started for it), or held back on purpose.
    pub booted: bool,
}

struct Booted {
    child: tokio::process::Child,
    namespace: String,
}

#[derive(Default)]
struct HypervisorState {
    launches: Vec<Launch>,
    booted: HashMap<String, Booted>,
    /// This many next launches are not booted (their agent never dials).
    hold_next: usize,
    /// This many next spot launches get an interruption notice before they boot.
    interrupt_next_spot: usize,
    /// Instances the harness terminated because their agent exited (power off).
    powered_off: usize,
    /// Instances whose agent was stopped because moto says they were terminated.
    stopped: usize,
    errors: Vec<String>,
}

/// Watches moto and boots what the core launches (see the module docs).
pub struct Hypervisor {
    state: Arc<Mutex<HypervisorState>>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    pub roots: tempfile::TempDir,
}

impl Hypervisor {
    /// `moto`: moto's own URL (not a fault proxy). `agent`: the image's
    /// `/usr/local/bin/stagely-agent`.
    pub fn start(moto: &str, network: Arc<Network>, imds: Imds, agent: PathBuf) -> Hypervisor {
        let client = ec2_client(moto);
        let state = Arc::new(Mutex::new(HypervisorState::default()));
        let stop = CancellationToken::new();
        let roots = tempfile::Builder::new()
            .prefix("stagely-instances-")
            .tempdir()
            .unwrap();
        let world = World {
            client,
            network,
            imds,
            agent,
            roots: roots.path().to_path_buf(),
            state: state.clone(),
        };
        let watching = stop.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = watching.cancelled() => break,
                }
                if let Err(error) = world.step().await {
                    world.state.lock().unwrap().errors.push(error);
                }
            }
            world.shut_down().await;
        });
        Hypervisor {
            state,
            stop,
            task: Some(task),
            roots,
        }
    }

    /// The next `count` launches are left unbooted: their agent never dials.
    /// Takes an instance's network link down (`up = false`: a dead network, not a reset;
    /// its connections see nothing at all) or back up.
    pub fn set_link(&self, instance_id: &str, up: bool) -> Result<(), String> {
        let namespace = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .booted
            .get(instance_id)
            .map(|booted| booted.namespace.clone())
            .ok_or_else(|| format!("{instance_id} is not running"))?;
        let (prefix, n) = namespace
            .rsplit_once('n')
            .ok_or_else(|| format!("unexpected namespace {namespace}"))?;
        let inside = format!("{prefix}i{n}");
        ip(&[
            "-n",
            &namespace,
            "link",
            "set",
            &inside,
            if up { "up" } else { "down" },
        ])?;
        if up {
            // Taking the link down dropped the default route with it.
            let _ = ip(&[
                "-n",
                &namespace,
                "route",
                "replace",
                "default",
                "via",
                &HOST_IP.to_string(),
            ]);
        }
        Ok(())
    }

    pub fn hold_next(&self, count: usize) {
        self.state.lock().unwrap().hold_next = count;
    }

    /// The next `count` spot launches are told at once (IMDS) that EC2 reclaims them.
    pub fn interrupt_next_spot(&self, count: usize) {
        self.state.lock().unwrap().interrupt_next_spot = count;
    }

    pub fn launches(&self) -> Vec<Launch> {
        self.state.lock().unwrap().launches.clone()
    }

    /// (powered off by their agent's exit, stopped because terminated in moto).
    pub fn ends(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap();
        (state.powered_off, state.stopped)
    }

    /// Problems the watcher met (a failed boot, an unreadable user-data).
    pub fn errors(&self) -> Vec<String> {
        self.state.lock().unwrap().errors.clone()
    }

    /// Agents still running.
    pub fn running(&self) -> usize {
        self.state.lock().unwrap().booted.len()
    }

    /// An instance's agent log (its stderr).
    pub fn agent_log(&self, instance_id: &str) -> String {
        std::fs::read_to_string(self.roots.path().join(instance_id).join("agent.log"))
            .unwrap_or_default()
    }

    /// Stops watching; kills every agent and removes its namespace.
    pub async fn shut_down(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Hypervisor {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct World {
    client: Client,
    network: Arc<Network>,
    imds: Imds,
    agent: PathBuf,
    roots: PathBuf,
    state: Arc<Mutex<HypervisorState>>,
}

impl World {
    async fn step(&self) -> Result<(), String> {
        let described = self
            .client
            .describe_instances()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("tag:stagely:managed")
                    .values("true")
                    .build(),
            )
            .send()
            .await
            .map_err(|error| format!("DescribeInstances: {error:?}"))?;
        let instances: Vec<aws_sdk_ec2::types::Instance> = described
            .reservations()
            .iter()
            .flat_map(|r| r.instances().iter().cloned())
            .collect();
        for instance in instances {
            let Some(id) = instance.instance_id().map(str::to_string) else {
                continue;
            };
            let state = instance
                .state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_string())
                .unwrap_or_default();
            let seen = self
                .state
                .lock()
                .unwrap()
                .launches
                .iter()
                .any(|launch| launch.instance_id == id);
            let live = state == "pending" || state == "running";
            if live && !seen {
                self.launch(&instance, &id).await?;
            } else if !live {
                let booted = self.state.lock().unwrap().booted.remove(&id);
                if let Some(booted) = booted {
                    stop_agent(booted).await;
                    self.state.lock().unwrap().stopped += 1;
                }
            }
        }
        // An agent that exited powers its instance off: shutdown behaviour terminate.
        let exited: Vec<String> = {
            let mut state = self.state.lock().unwrap();
            let mut exited = Vec::new();
            for (id, booted) in state.booted.iter_mut() {
                if booted.child.try_wait().ok().flatten().is_some() {
                    exited.push(id.clone());
                }
            }
            exited
        };
        for id in exited {
            let terminate_on_shutdown = self
                .state
                .lock()
                .unwrap()
                .launches
                .iter()
                .any(|launch| launch.instance_id == id && launch.terminate_on_shutdown);
            let booted = self.state.lock().unwrap().booted.remove(&id);
            if let Some(booted) = booted {
                stop_agent(booted).await;
            }
            if terminate_on_shutdown {
                self.client
                    .terminate_instances()
                    .instance_ids(&id)
                    .send()
                    .await
                    .map_err(|error| format!("TerminateInstances {id}: {error:?}"))?;
                self.state.lock().unwrap().powered_off += 1;
            }
        }
        Ok(())
    }

    async fn launch(
        &self,
        instance: &aws_sdk_ec2::types::Instance,
        id: &str,
    ) -> Result<(), String> {
        let tags: BTreeMap<String, String> = instance
            .tags()
            .iter()
            .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
            .collect();
        let metadata = instance.metadata_options();
        let user_data = self
            .client
            .describe_instance_attribute()
            .instance_id(id)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
            .send()
            .await
            .map_err(|error| format!("DescribeInstanceAttribute userData {id}: {error:?}"))?
            .user_data()
            .and_then(|value| value.value())
            .map(|encoded| {
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        let shutdown = self
            .client
            .describe_instance_attribute()
            .instance_id(id)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::InstanceInitiatedShutdownBehavior)
            .send()
            .await
            .map_err(|error| format!("DescribeInstanceAttribute shutdown {id}: {error:?}"))?
            .instance_initiated_shutdown_behavior()
            .and_then(|value| value.value())
            .map(str::to_string);
        let schema = cloud_init_schema(&self.roots, id, &user_data).await;
        let spot = instance.instance_lifecycle().map(|l| l.as_str()) == Some("spot");
        let (held, interrupted) = {
            let mut state = self.state.lock().unwrap();
            let held = state.hold_next > 0;
            state.hold_next = state.hold_next.saturating_sub(1);
            let interrupted = spot && state.interrupt_next_spot > 0;
            if interrupted {
                state.interrupt_next_spot -= 1;
            }
            (held, interrupted)
        };
        if interrupted {
            self.imds.interrupt(id);
        }
        let mut launch = Launch {
            instance_id: id.to_string(),
            spot,
            http_tokens_required: metadata.and_then(|m| m.http_tokens()).map(|t| t.as_str())
                == Some("required"),
            hop_limit: metadata.and_then(|m| m.http_put_response_hop_limit()),
            terminate_on_shutdown: shutdown.as_deref() == Some("terminate"),
            image_id: instance.image_id().unwrap_or_default().to_string(),
            tags,
            schema,
            user_data,
            booted: false,
        };
        if !held {
            match self.boot(id, &launch.user_data).await {
                Ok(booted) => {
                    launch.booted = true;
                    self.state
                        .lock()
                        .unwrap()
                        .booted
                        .insert(id.to_string(), booted);
                }
                Err(error) => {
                    self.state
                        .lock()
                        .unwrap()
                        .errors
                        .push(format!("booting {id}: {error}"));
                }
            }
        }
        self.state.lock().unwrap().launches.push(launch);
        Ok(())
    }

    /// Applies the user-data as cloud-init would and starts what the unit names.
    async fn boot(&self, id: &str, user_data: &str) -> Result<Booted, String> {
        let files = stagely_cloud_init::written_files(user_data).map_err(|e| e.to_string())?;
        let root = self.roots.join(id);
        let under_root = |path: &str| root.join(path.trim_start_matches('/'));
        let mut unit = None;
        for file in &files {
            let path = under_root(&file.path);
            std::fs::create_dir_all(path.parent().unwrap()).map_err(|e| e.to_string())?;
            std::fs::write(&path, &file.content).map_err(|e| e.to_string())?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(file.mode()))
                .map_err(|e| e.to_string())?;
            if file.path == stagely_cloud_init::UNIT_PATH {
                unit = Some(file.content.clone());
            }
        }
        let unit = unit.ok_or("the user-data writes no agent unit")?;
        let command =
            stagely_cloud_init::unit_exec_start(&unit).ok_or("the unit has no ExecStart")?;
        // The instance's paths live under its root; the image's agent is ours.
        let config_path = under_root(stagely_cloud_init::AGENT_CONFIG_PATH);
        let text = std::fs::read_to_string(&config_path).map_err(|e| e.to_string())?;
        let mut config =
            stagely_cloud_init::AgentConfig::from_toml(&text).map_err(|e| e.to_string())?;
        config.ca_file = config
            .ca_file
            .map(|path| under_root(&path.to_string_lossy()));
        config.work_dir = Some(under_root("/var/lib/stagely"));
        let rewritten = toml::to_string(&config).map_err(|e| e.to_string())?;
        std::fs::write(&config_path, rewritten).map_err(|e| e.to_string())?;
        let (namespace, address) = self.network.host()?;
        self.imds.register(address, id);
        let mut args: Vec<String> = command[1..].to_vec();
        if let Some(at) = args.iter().position(|arg| arg == "--config")
            && let Some(value) = args.get_mut(at + 1)
        {
            *value = config_path.to_string_lossy().into_owned();
        }
        let log = std::fs::File::create(root.join("agent.log")).map_err(|e| e.to_string())?;
        // `nsenter --net`, not `ip netns exec`: the latter mounts a fresh /sys for the
        // namespace, which hides the cgroup mount runc needs for RUN steps.
        let child = tokio::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{namespace}"))
            .arg("--")
            .arg(&self.agent)
            .args(&args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", root.to_string_lossy().as_ref())
            .env("STAGELY_INSTANCE_ID", id)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting the agent: {e}"))?;
        Ok(Booted { child, namespace })
    }

    async fn shut_down(&self) {
        let booted: Vec<Booted> = self
            .state
            .lock()
            .unwrap()
            .booted
            .drain()
            .map(|(_, b)| b)
            .collect();
        for booted in booted {
            stop_agent(booted).await;
        }
        self.imds.stop();
    }
}

/// Kills the agent's whole process group (the instance is gone) and its namespace.
async fn stop_agent(mut booted: Booted) {
    if let Some(pid) = booted.child.id() {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = booted.child.wait().await;
    let _ = ip(&["netns", "del", &booted.namespace]);
}

/// `cloud-init schema` on one user-data.
async fn cloud_init_schema(dir: &Path, id: &str, user_data: &str) -> Result<(), String> {
    let path = dir.join(format!("{id}.user-data"));
    std::fs::write(&path, user_data).map_err(|e| e.to_string())?;
    let out = tokio::process::Command::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(&path)
        .output()
        .await
        .map_err(|e| format!("cloud-init: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
