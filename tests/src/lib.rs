//! Shared harness for the end-to-end tests: real peers, no mocks of them.
//!
//! A [`TestCore`] is a core started in-process on port 0 with a throwaway SQLite database,
//! the local provider (real `stagely-agent` processes) and a real Distribution registry with
//! a random password. Tests drive it only through the HTTP API and the agent endpoint, and
//! wait with [`poll_until`], which reports the last state it saw when it gives up.
//!
//! Peers (buildah, docker-registry, git, skopeo, cloud-init, qemu binfmt) are checked with
//! [`require`]: missing outside CI, a test skips with a note; missing in CI (`CI=true`), the
//! test fails.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use stagely_api::{LogPage, RunView};
use stagely_core::registry::LocalRegistry;
use stagely_provisioning::{Instance, InstanceState, MachineSpec, Provider, ProviderError};
use stagely_server::config::{CoreConfig, FileConfig, Overrides};
use stagely_server::server::{self, RunningCore};

pub mod counting;
pub mod ec2;
pub mod flood;
pub mod proxy;

/// True when running under CI, where a missing peer is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Checks that `program` runs (`program arg` exits 0). Outside CI a missing peer returns
/// false with a note (the test skips); in CI it panics.
pub fn require(program: &str, arg: &str) -> bool {
    let ok = std::process::Command::new(program)
        .arg(arg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !in_ci(),
            "peer `{program}` is missing; CI requires it (run scripts/setup.sh)"
        );
        eprintln!("SKIPPED: `{program}` is not installed here (run scripts/setup.sh)");
    }
    ok
}

/// Every peer a real build needs.
pub fn require_build_peers() -> bool {
    require("buildah", "--version")
        && require("runc", "--version")
        && require("docker-registry", "--version")
        && require("git", "--version")
        && require("skopeo", "--version")
}

/// arm64 user emulation through binfmt_misc.
pub fn require_arm64_emulation() -> bool {
    let ok = std::env::consts::ARCH == "aarch64"
        || stagely_provisioning::local::emulation_available(stagely_protocol::Arch::Arm64);
    if !ok {
        assert!(
            !in_ci(),
            "qemu-aarch64 binfmt_misc handler is missing; CI requires it (run scripts/setup.sh)"
        );
        eprintln!("SKIPPED: no qemu-aarch64 binfmt_misc handler (run scripts/setup.sh)");
    }
    ok
}

/// The `stagely-agent` binary of this workspace's build.
pub fn agent_binary() -> PathBuf {
    server::find_agent_binary().unwrap_or_else(|| {
        panic!(
            "stagely-agent is not built next to the test binary; run `cargo build --workspace --bins` first (scripts/test.sh does)"
        )
    })
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Waits until `check` returns `Ok(Some(value))`, polling every 100 ms. On timeout, panics
/// with the last state `check` described.
pub async fn poll_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<(Option<T>, String)>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last;
    loop {
        match check().await {
            Ok((Some(value), _)) => return value,
            Ok((None, state)) => last = state,
            Err(error) => last = format!("error: {error:#}"),
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last state: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A git repository in a temporary directory.
pub struct TestRepo {
    pub dir: tempfile::TempDir,
    pub commit: String,
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "stagely-tests")
        .env("GIT_AUTHOR_EMAIL", "tests@stagely.invalid")
        .env("GIT_COMMITTER_NAME", "stagely-tests")
        .env("GIT_COMMITTER_EMAIL", "tests@stagely.invalid")
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

impl TestRepo {
    /// A repository whose first commit holds a copy of `source`.
    pub fn from_dir(source: &Path) -> anyhow::Result<TestRepo> {
        let dir = tempfile::Builder::new().prefix("stagely-repo-").tempdir()?;
        copy_tree(source, dir.path())?;
        Self::commit_all(dir)
    }

    /// A repository with the given files (path → contents).
    pub fn with_files(files: &[(&str, &[u8])]) -> anyhow::Result<TestRepo> {
        let dir = tempfile::Builder::new().prefix("stagely-repo-").tempdir()?;
        for (path, contents) in files {
            let full = dir.path().join(path);
            if let Some(parent) = full.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&full, contents)?;
            // Binaries (ELF) are committed executable, as git records the mode.
            if contents.starts_with(b"\x7fELF") {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&full, std::fs::Permissions::from_mode(0o755))?;
            }
        }
        Self::commit_all(dir)
    }

    fn commit_all(dir: tempfile::TempDir) -> anyhow::Result<TestRepo> {
        git(dir.path(), &["init", "-q", "-b", "main"])?;
        git(dir.path(), &["add", "-A"])?;
        git(dir.path(), &["commit", "-q", "-m", "test fixture"])?;
        let commit = git(dir.path(), &["rev-parse", "HEAD"])?;
        Ok(TestRepo { dir, commit })
    }

    pub fn url(&self) -> String {
        self.dir.path().to_string_lossy().into_owned()
    }

    /// Commits whatever changed in the working tree (e.g. symbolic links added by a test).
    pub fn commit_more(repo: TestRepo, message: &str) -> anyhow::Result<TestRepo> {
        git(repo.dir.path(), &["add", "-A"])?;
        git(repo.dir.path(), &["commit", "-q", "-m", message])?;
        let commit = git(repo.dir.path(), &["rev-parse", "HEAD"])?;
        Ok(TestRepo {
            dir: repo.dir,
            commit,
        })
    }
}

/// Static busybox for `arch` (installed by scripts/setup.sh), to give `FROM scratch`
/// images a shell for RUN steps.
pub fn busybox(arch: &str) -> anyhow::Result<Vec<u8>> {
    let path = format!("/usr/local/lib/stagely/busybox-{arch}");
    std::fs::read(&path).with_context(|| format!("{path} is missing; run scripts/setup.sh"))
}

/// An HTTP client that presents `token` as the API bearer token on every request.
pub fn client_with_token(token: &str) -> reqwest::Client {
    client_trusting(token, None)
}

/// Like [`client_with_token`], also trusting the PEM CA `ca_pem` (a core serving TLS).
pub fn client_trusting(token: &str, ca_pem: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .expect("a token is header text"),
    );
    let mut builder = reqwest::Client::builder().default_headers(headers);
    if let Some(pem) = ca_pem {
        builder = builder.add_root_certificate(
            reqwest::Certificate::from_pem(pem.as_bytes()).expect("a PEM CA"),
        );
    }
    builder.build().expect("an HTTP client")
}

/// A running core plus its registry.
/// Which store the tests run against: `STAGELY_TEST_DATABASE=postgres` for PostgreSQL on
/// 127.0.0.1:5432 (a fresh database per core, dropped after), else SQLite.
pub fn testing_postgres() -> bool {
    std::env::var("STAGELY_TEST_DATABASE").is_ok_and(|v| v == "postgres")
}

/// Which store a [`TestCore`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded default: a file in the core's data directory.
    Sqlite,
    /// A fresh database on [`POSTGRES_ADMIN_URL`]'s server, dropped with the core.
    Postgres,
}

impl Backend {
    /// The one `STAGELY_TEST_DATABASE` picks (SQLite unless it says `postgres`).
    pub fn from_env() -> Backend {
        if testing_postgres() {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        })
    }
}

/// The server every test database is created on.
pub const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A PostgreSQL database of one test, dropped (with its connections) when this is dropped.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub async fn create() -> TestDatabase {
        use sqlx::Connection;
        let name = format!("stagely_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(POSTGRES_ADMIN_URL)
            .await
            .expect("PostgreSQL answers on 127.0.0.1:5432 (run scripts/setup.sh)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("creating the test database");
        let _ = admin.close().await;
        TestDatabase {
            url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
            name,
        }
    }

    /// Only when the tests run against PostgreSQL.
    pub async fn for_tests() -> Option<TestDatabase> {
        if testing_postgres() {
            Some(TestDatabase::create().await)
        } else {
            None
        }
    }
}

impl TestDatabase {
    /// Every row of every table as text: what a secret scan of the database reads.
    pub async fn dump(&self) -> Vec<u8> {
        use sqlx::Connection;
        let mut connection = sqlx::PgConnection::connect(&self.url)
            .await
            .expect("the test database answers");
        let mut out = Vec::new();
        for table in [
            "workflow_runs",
            "build_jobs",
            "build_logs",
            "log_chunks",
            "job_attempts",
            "builder_instances",
        ] {
            let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT t::text FROM {table} t"
            )))
            .fetch_all(&mut connection)
            .await
            .expect("dumping a table");
            for row in rows {
                out.extend_from_slice(row.as_bytes());
                out.push(b'\n');
            }
        }
        // Packed log chunks hold their lines compressed: unpacked, so a scan of the dump sees
        // every stored line.
        let packed = sqlx::query_scalar(PACKED_CHUNKS)
            .fetch_all(&mut connection)
            .await
            .expect("reading packed chunks");
        out.extend(unpack_all(packed));
        let _ = connection.close().await;
        out
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime guarantee: a small one of its own, on a thread.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                use sqlx::Connection;
                if let Ok(mut admin) = sqlx::PgConnection::connect(POSTGRES_ADMIN_URL).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await;
                    let _ = admin.close().await;
                }
            });
        })
        .join();
    }
}

/// The file configuration of a core with the local provider (this build's agent), edited by
/// `configure`.
fn local_file_config(configure: impl FnOnce(&mut FileConfig)) -> FileConfig {
    let mut file = FileConfig::default();
    file.provider.agent_binary = Some(agent_binary());
    configure(&mut file);
    file
}

pub struct TestCore {
    pub core: Option<RunningCore>,
    /// The PostgreSQL database when the tests run against it; dropped with the core.
    pub database: Option<TestDatabase>,
    pub registry: LocalRegistry,
    pub data: tempfile::TempDir,
    /// Sends [`TestCore::api_token`] on every request.
    pub client: reqwest::Client,
    /// The API token this core accepts (for CLI runs: `STAGELY_API_TOKEN`).
    pub api_token: String,
    pub provider: Arc<dyn Provider>,
    pub url: String,
}

impl TestCore {
    /// Sends `signal` to the agent of this core's one running local instance (the agent
    /// itself, not the `unshare` that started it): a VM dying (SIGKILL) or shutting down
    /// (SIGTERM). Panics unless exactly one agent runs.
    pub fn signal_the_agent(&self, signal: nix::sys::signal::Signal) {
        let data = self.data.path().to_string_lossy().to_string();
        let agents: Vec<(i32, String)> = cmdlines()
            .into_iter()
            .filter(|(_, c)| {
                c.contains("stagely-agent") && c.contains(&data) && !c.contains("unshare")
            })
            .collect();
        assert_eq!(agents.len(), 1, "{agents:?}");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(agents[0].0), signal)
            .expect("signalling the agent");
    }

    /// A core with the local provider and a fresh registry.
    pub async fn start() -> anyhow::Result<TestCore> {
        let data = tempfile::Builder::new().prefix("stagely-core-").tempdir()?;
        let mut file = FileConfig::default();
        file.provider.agent_binary = Some(agent_binary());
        let registry = LocalRegistry::start().await?;
        Self::start_with(data, registry, file, None).await
    }

    /// A core with the local provider and a fresh registry, its file configuration edited by
    /// `configure` first.
    pub async fn start_configured(
        configure: impl FnOnce(&mut FileConfig),
    ) -> anyhow::Result<TestCore> {
        Self::start_local_on(Backend::from_env(), configure).await
    }

    /// A core whose local provider is wrapped by `wrap` (to inject failures), its file
    /// configuration edited by `configure` first.
    pub async fn start_wrapped(
        configure: impl FnOnce(&mut FileConfig),
        wrap: impl FnOnce(Arc<dyn Provider>) -> Arc<dyn Provider>,
    ) -> anyhow::Result<TestCore> {
        let data = tempfile::Builder::new().prefix("stagely-core-").tempdir()?;
        let file = local_file_config(configure);
        let registry = LocalRegistry::start().await?;
        let local = Arc::new(stagely_provisioning::local::LocalProvider::new(
            agent_binary(),
            data.path().join("instances"),
        )?);
        Self::start_with(data, registry, file, Some(wrap(local))).await
    }

    /// A core with `provider` instead of the local one (agents are then the test's job).
    pub async fn start_with_provider(provider: Arc<dyn Provider>) -> anyhow::Result<TestCore> {
        let data = tempfile::Builder::new().prefix("stagely-core-").tempdir()?;
        let registry = LocalRegistry::start().await?;
        Self::start_with(data, registry, FileConfig::default(), Some(provider)).await
    }

    /// A core with the local provider on the `backend` named (not the one
    /// `STAGELY_TEST_DATABASE` picks), its file configuration edited by `configure` first.
    pub async fn start_local_on(
        backend: Backend,
        configure: impl FnOnce(&mut FileConfig),
    ) -> anyhow::Result<TestCore> {
        let data = tempfile::Builder::new().prefix("stagely-core-").tempdir()?;
        let file = local_file_config(configure);
        let registry = LocalRegistry::start().await?;
        Self::start_on(data, registry, file, None, backend).await
    }

    /// A core with `provider`, on the `backend` named (not the one `STAGELY_TEST_DATABASE`
    /// picks), its file configuration edited by `configure` first.
    pub async fn start_with_provider_on(
        provider: Arc<dyn Provider>,
        backend: Backend,
        configure: impl FnOnce(&mut FileConfig),
    ) -> anyhow::Result<TestCore> {
        let data = tempfile::Builder::new().prefix("stagely-core-").tempdir()?;
        let registry = LocalRegistry::start().await?;
        let mut file = FileConfig::default();
        configure(&mut file);
        Self::start_on(data, registry, file, Some(provider), backend).await
    }

    async fn start_with(
        data: tempfile::TempDir,
        registry: LocalRegistry,
        file: FileConfig,
        provider: Option<Arc<dyn Provider>>,
    ) -> anyhow::Result<TestCore> {
        Self::start_on(data, registry, file, provider, Backend::from_env()).await
    }

    async fn start_on(
        data: tempfile::TempDir,
        registry: LocalRegistry,
        file: FileConfig,
        provider: Option<Arc<dyn Provider>>,
        backend: Backend,
    ) -> anyhow::Result<TestCore> {
        Self::start_at(data, registry, file, provider, backend, "127.0.0.1").await
    }

    /// A core with `provider` listening on `ip` (a test network's host address; off
    /// loopback the file must configure `[tls]`, and `public_url` becomes `https://IP:PORT`),
    /// its file configuration edited by `configure` first.
    pub async fn start_on_network(
        provider: Arc<dyn Provider>,
        registry: LocalRegistry,
        ip: &str,
        configure: impl FnOnce(&mut FileConfig),
    ) -> anyhow::Result<TestCore> {
        let data = tempfile::Builder::new().prefix("stagely-core-").tempdir()?;
        let mut file = FileConfig::default();
        configure(&mut file);
        Self::start_at(
            data,
            registry,
            file,
            Some(provider),
            Backend::from_env(),
            ip,
        )
        .await
    }

    async fn start_at(
        data: tempfile::TempDir,
        registry: LocalRegistry,
        mut file: FileConfig,
        provider: Option<Arc<dyn Provider>>,
        backend: Backend,
        ip: &str,
    ) -> anyhow::Result<TestCore> {
        file.registry.username = Some(registry.username.clone());
        file.registry.password = Some(registry.password.clone());
        file.scheduler.agent_connect_timeout_secs =
            file.scheduler.agent_connect_timeout_secs.or(Some(60));
        let database = match backend {
            Backend::Postgres => Some(TestDatabase::create().await),
            Backend::Sqlite => None,
        };
        if let Some(database) = &database {
            file.database_url = Some(database.url.clone());
        }
        // Test repositories are local directories.
        file.allow_local_repos = file.allow_local_repos.or(Some(true));
        let api_token = stagely_core::cli::new_api_token();
        let ca_pem = file
            .tls
            .agent_ca_file
            .as_ref()
            .map(std::fs::read_to_string)
            .transpose()?;
        // Bound first, so the port is known for `public_url`.
        let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
        let bound = listener.local_addr()?;
        if ip != "127.0.0.1" && file.public_url.is_none() {
            file.public_url = Some(format!("https://{bound}"));
        }
        let config = CoreConfig::resolve(
            file,
            Overrides {
                listen: Some(bound.to_string()),
                data_dir: Some(data.path().to_path_buf()),
                registry: Some(registry.host.clone()),
                api_token: Some(stagely_server::config::ApiToken::from_secret(
                    "tests", &api_token,
                )),
                ..Overrides::default()
            },
        )?;
        let provider = match provider {
            Some(provider) => provider,
            None => server::local_provider(&config)?,
        };
        let core = server::start(config, listener, provider.clone()).await?;
        let url = core.url();
        Ok(TestCore {
            core: Some(core),
            database,
            registry,
            data,
            client: client_trusting(&api_token, ca_pem.as_deref()),
            api_token,
            provider,
            url,
        })
    }

    /// `POST /api/v1/workflows`; returns the HTTP status and body.
    pub async fn submit_raw(
        &self,
        body: serde_json::Value,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let response = self
            .client
            .post(format!("{}/api/v1/workflows", self.url))
            .json(&body)
            .send()
            .await?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(serde_json::Value::Null);
        Ok((status, body))
    }

    /// Submits a run of `repo` and returns its id.
    pub async fn submit(
        &self,
        repo: &TestRepo,
        stagely_yaml: Option<&str>,
        environment: &str,
    ) -> anyhow::Result<RunView> {
        let (status, body) = self
            .submit_raw(serde_json::json!({
                "repo_url": repo.url(),
                "commit_hash": repo.commit,
                "branch": "main",
                "environment_id": environment,
                "trigger": "pr_opened",
                "stagely_yaml": stagely_yaml,
            }))
            .await?;
        anyhow::ensure!(status == 201, "submit answered {status}: {body}");
        Ok(serde_json::from_value(body)?)
    }

    pub async fn run(&self, run_id: &str) -> anyhow::Result<RunView> {
        Ok(self
            .client
            .get(format!("{}/api/v1/workflows/{run_id}", self.url))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Waits for the run to reach `completed` or `failed`.
    pub async fn wait_finished(&self, run_id: &str, timeout: Duration) -> RunView {
        poll_until(timeout, "the run to finish", || async {
            let view = self.run(run_id).await?;
            let state = format!(
                "run {} [{}]",
                view.status,
                view.jobs
                    .iter()
                    .map(|j| format!("{}={}", j.name, j.status))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let done = matches!(view.status.as_str(), "completed" | "failed");
            Ok((done.then_some(view), state))
        })
        .await
    }

    /// Every stored line of a job, page by page: (stream, line).
    pub async fn logs(&self, job_id: &str) -> anyhow::Result<Vec<(String, String)>> {
        Ok(all_log_lines(&self.client, &self.url, job_id)
            .await?
            .into_iter()
            .map(|l| (l.stream, l.line))
            .collect())
    }

    /// Everything the core stored: every file under its data directory (SQLite, WAL,
    /// instance directories, agent logs) and, on PostgreSQL, a dump of every table.
    pub async fn stored(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out: Vec<(PathBuf, Vec<u8>)> = Vec::new();
        for file in files_under(self.data.path()) {
            // A SQLite log file's packed chunks hold their lines compressed: their text too,
            // so a scan of what was stored sees every line.
            if file.to_string_lossy().ends_with(".logs.db") {
                out.push((
                    file.with_extension("db (unpacked chunks)"),
                    sqlite_unpacked(&file).await,
                ));
            }
            let bytes = std::fs::read(&file).unwrap_or_default();
            out.push((file, bytes));
        }
        if let Some(database) = &self.database {
            out.push((
                PathBuf::from(format!("postgres:{}", database.name)),
                database.dump().await,
            ));
        }
        out
    }

    /// Instances the provider still has for this core (must be none after a run).
    pub async fn live_instances(&self) -> Vec<Instance> {
        self.provider
            .list_instances(&BTreeMap::new())
            .await
            .expect("the provider lists its instances")
    }

    pub async fn stop(&mut self) {
        if let Some(core) = self.core.take() {
            core.stop().await;
        }
    }
}

/// Every packed log chunk a database holds.
const PACKED_CHUNKS: &str = "SELECT packed FROM log_chunks WHERE packed IS NOT NULL";

/// The text of packed log chunks, unpacked by the core's own code (damage check included).
fn unpack_all(packed: Vec<Vec<u8>>) -> Vec<u8> {
    packed
        .iter()
        .flat_map(|chunk| {
            stagely_server::db::chunks::unpack("scan", 0, chunk)
                .expect("a packed chunk unpacks")
                .into_bytes()
        })
        .collect()
}

/// The unpacked text of every packed chunk in a SQLite log file.
async fn sqlite_unpacked(file: &Path) -> Vec<u8> {
    use sqlx::Connection;
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(file)
        .read_only(true);
    let mut connection = sqlx::SqliteConnection::connect_with(&options)
        .await
        .expect("the log file opens");
    let packed = sqlx::query_scalar(PACKED_CHUNKS)
        .fetch_all(&mut connection)
        .await
        .expect("reading packed chunks");
    let _ = connection.close().await;
    unpack_all(packed)
}

/// Every stored line of a job from the core at `url`, page by page.
pub async fn all_log_lines(
    client: &reqwest::Client,
    url: &str,
    job_id: &str,
) -> anyhow::Result<Vec<stagely_api::LogLineView>> {
    let mut after = 0;
    let mut lines = Vec::new();
    loop {
        let page: LogPage = client
            .get(format!(
                "{url}/api/v1/jobs/{job_id}/logs?after={after}&limit=10000"
            ))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if page.lines.is_empty() {
            return Ok(lines);
        }
        after = page.next_after;
        lines.extend(page.lines);
    }
}

/// What the registry holds for one reference.
#[derive(Debug)]
pub struct RegistryImage {
    pub digest: String,
    pub media_type: String,
    /// `os/arch` of a single image; one entry per child for an index.
    pub platforms: Vec<String>,
    /// The children's digests, for an index.
    pub children: Vec<String>,
}

/// Reads a manifest (and its config or children) over the registry API.
pub async fn inspect_image(registry: &LocalRegistry, image: &str) -> anyhow::Result<RegistryImage> {
    let client = reqwest::Client::new();
    let rest = image
        .strip_prefix(&format!("{}/", registry.host))
        .with_context(|| format!("{image} is not in {}", registry.host))?;
    let (repo, reference) = match rest.split_once('@') {
        Some((repo, digest)) => (repo, digest),
        None => rest.rsplit_once(':').context("image has no tag")?,
    };
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json";
    let get = |path: String| {
        client
            .get(format!("http://{}/v2/{repo}/{path}", registry.host))
            .basic_auth(&registry.username, Some(&registry.password))
            .header("Accept", accept)
            .send()
    };
    let response = get(format!("manifests/{reference}"))
        .await?
        .error_for_status()?;
    let digest = response
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .context("no Docker-Content-Digest")?
        .to_string();
    let manifest: serde_json::Value = response.json().await?;
    let media_type = manifest["mediaType"].as_str().unwrap_or("").to_string();
    let mut platforms = Vec::new();
    let mut child_digests = Vec::new();
    if let Some(children) = manifest["manifests"].as_array() {
        for child in children {
            child_digests.push(child["digest"].as_str().unwrap_or("?").to_string());
            platforms.push(format!(
                "{}/{}",
                child["platform"]["os"].as_str().unwrap_or("?"),
                child["platform"]["architecture"].as_str().unwrap_or("?")
            ));
        }
    } else {
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .context("manifest has no config")?;
        let config: serde_json::Value = get(format!("blobs/{config_digest}"))
            .await?
            .error_for_status()?
            .json()
            .await?;
        platforms.push(format!(
            "{}/{}",
            config["os"].as_str().unwrap_or("?"),
            config["architecture"].as_str().unwrap_or("?")
        ));
    }
    Ok(RegistryImage {
        digest,
        media_type,
        platforms,
        children: child_digests,
    })
}

/// Cross-checks a digest with skopeo, authenticating through an auth file (never argv).
pub fn skopeo_digest(registry: &LocalRegistry, image: &str) -> anyhow::Result<String> {
    use base64::Engine;
    let dir = tempfile::tempdir()?;
    let auth = dir.path().join("auth.json");
    let encoded = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", registry.username, registry.password));
    let mut file = std::fs::File::create(&auth)?;
    write!(
        file,
        "{}",
        serde_json::json!({"auths": {registry.host.clone(): {"auth": encoded}}})
    )?;
    let output = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", "--authfile"])
        .arg(&auth)
        .arg(format!("docker://{image}"))
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "skopeo inspect {image}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    use sha2::Digest;
    Ok(format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(&output.stdout))
    ))
}

/// A provider that boots nothing: it records each instance's user-data so a test can play
/// the agent itself (or misbehave as one).
#[derive(Default)]
pub struct RecordingProvider {
    pub created: Mutex<Vec<(String, MachineSpec)>>,
    pub terminated: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Provider for RecordingProvider {
    fn name(&self) -> &'static str {
        "recording"
    }

    async fn create_instance(&self, spec: &MachineSpec) -> Result<Instance, ProviderError> {
        let mut created = self.created.lock().unwrap_or_else(|e| e.into_inner());
        let id = format!("rec-{}", created.len());
        created.push((id.clone(), spec.clone()));
        Ok(Instance {
            id,
            instance_type: "recording".into(),
            host_arch: spec.arch,
            emulated: false,
            tags: spec.tags.clone(),
            market: None,
            notice: None,
        })
    }

    async fn terminate_instance(&self, instance_id: &str) -> Result<(), ProviderError> {
        self.terminated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(instance_id.to_string());
        Ok(())
    }

    /// Nothing runs but the test playing the agent: an instance runs until terminated.
    async fn instance_state(&self, instance_id: &str) -> Result<InstanceState, ProviderError> {
        let terminated = self.terminated.lock().unwrap_or_else(|e| e.into_inner());
        Ok(if terminated.iter().any(|id| id == instance_id) {
            InstanceState::Gone {
                detail: "terminated".into(),
            }
        } else {
            InstanceState::Running
        })
    }

    async fn list_instances(
        &self,
        _tags: &BTreeMap<String, String>,
    ) -> Result<Vec<Instance>, ProviderError> {
        let created = self.created.lock().unwrap_or_else(|e| e.into_inner());
        let terminated = self.terminated.lock().unwrap_or_else(|e| e.into_inner());
        Ok(created
            .iter()
            .filter(|(id, _)| !terminated.contains(id))
            .map(|(id, spec)| Instance {
                id: id.clone(),
                instance_type: "recording".into(),
                host_arch: spec.arch,
                emulated: false,
                tags: spec.tags.clone(),
                market: None,
                notice: None,
            })
            .collect())
    }
}

impl RecordingProvider {
    /// (job id tag, agent token) of every instance created so far.
    pub fn tokens(&self) -> Vec<(String, String)> {
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(_, spec)| {
                let bootstrap = stagely_cloud_init::read_user_data(&spec.user_data)
                    .expect("the core renders valid user-data");
                (
                    spec.tags.get("stagely:job").cloned().unwrap_or_default(),
                    bootstrap.agent.token,
                )
            })
            .collect()
    }
}

/// Captures the process's tracing output so tests can check what the core logged.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    /// Installs (once per test binary) a global subscriber writing into the capture.
    pub fn install() -> LogCapture {
        static CAPTURE: std::sync::OnceLock<LogCapture> = std::sync::OnceLock::new();
        CAPTURE
            .get_or_init(|| {
                let capture = LogCapture::default();
                let writer = capture.clone();
                let _ = tracing_subscriber::fmt()
                    .with_env_filter(tracing_subscriber::EnvFilter::new(
                        "debug,sqlx=warn,hyper=info,tower=info",
                    ))
                    .with_ansi(false)
                    .with_writer(move || writer.clone())
                    .try_init();
                capture
            })
            .clone()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `stagely serve` as a separate process (for crash and signal tests), with a port, a data
/// directory and registry credentials in its environment.
pub struct ServeProcess {
    pub child: std::process::Child,
    pub url: String,
    /// The API token the process accepts (`STAGELY_API_TOKEN` in its environment).
    pub api_token: String,
    port: u16,
    data: PathBuf,
    /// Its `stagely.toml` (a restart reuses it).
    config: PathBuf,
    /// Where its stderr goes (replicas), else nowhere.
    log: Option<PathBuf>,
    registry_host: String,
    registry_username: String,
    registry_password: String,
    client: reqwest::Client,
    /// The PostgreSQL database when the tests run against it (kept across restarts).
    pub database: Option<TestDatabase>,
}

impl ServeProcess {
    /// Starts `stagely serve` on a free port and waits until `/healthz` answers. Its config
    /// allows local repositories (test repositories are directories).
    pub async fn start(data: &Path, registry: &LocalRegistry) -> ServeProcess {
        Self::start_with_config(data, registry, "allow_local_repos = true\n").await
    }

    /// Like [`ServeProcess::start`] with `config` as its `stagely.toml`.
    pub async fn start_with_config(
        data: &Path,
        registry: &LocalRegistry,
        config: &str,
    ) -> ServeProcess {
        let config_path = data.join("stagely-test.toml");
        std::fs::create_dir_all(data).expect("data dir");
        let database = TestDatabase::for_tests().await;
        let config = match &database {
            // Top-level keys go before any table.
            Some(database) => format!("database_url = \"{}\"\n{config}", database.url),
            None => config.to_string(),
        };
        std::fs::write(&config_path, config).expect("test config");
        Self::launch(data, config_path, registry, None, database).await
    }

    /// One of several cores sharing `database_url` (PostgreSQL) and `data` (the local
    /// provider's instances, so any replica can terminate any instance, as on a cloud):
    /// `core_id = name`, config `<data>/<name>.toml` (with `extra` appended), stderr in
    /// `<data>/<name>.log`.
    pub async fn start_replica(
        data: &Path,
        name: &str,
        registry: &LocalRegistry,
        database_url: &str,
        extra: &str,
    ) -> ServeProcess {
        std::fs::create_dir_all(data).expect("data dir");
        let config_path = data.join(format!("{name}.toml"));
        let log = data.join(format!("{name}.log"));
        std::fs::write(
            &config_path,
            format!("core_id = \"{name}\"\ndatabase_url = \"{database_url}\"\nallow_local_repos = true\n{extra}"),
        )
        .expect("replica config");
        Self::launch(data, config_path, registry, Some(log), None).await
    }

    /// Starts `stagely serve` with `config` on a free port and waits until it answers.
    async fn launch(
        data: &Path,
        config: PathBuf,
        registry: &LocalRegistry,
        log: Option<PathBuf>,
        mut database: Option<TestDatabase>,
    ) -> ServeProcess {
        // The port is free when picked but not held: another test may take it before this
        // core binds it. Then this core exits at once (and `/healthz` may be answered by
        // the other one): try another port.
        let mut tries = 0;
        loop {
            tries += 1;
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free port");
            let mut process =
                Self::spawn_on(port, data, &config, registry, log.clone(), database.take());
            match process.wait_healthy_or_exit().await {
                Ok(()) => return process,
                Err(status) if tries < 5 => {
                    database = process.database.take();
                    eprintln!(
                        "stagely serve on port {port} exited ({status}): trying another port"
                    );
                }
                Err(status) => panic!("stagely serve exited {status} on 5 ports"),
            }
        }
    }

    fn spawn_on(
        port: u16,
        data: &Path,
        config: &Path,
        registry: &LocalRegistry,
        log: Option<PathBuf>,
        database: Option<TestDatabase>,
    ) -> ServeProcess {
        let config = config.to_path_buf();
        let api_token = stagely_core::cli::new_api_token();
        ServeProcess {
            child: spawn_serve(
                port,
                data,
                &config,
                &registry.host,
                &registry.username,
                &registry.password,
                &api_token,
                log.as_deref(),
            ),
            url: format!("http://127.0.0.1:{port}"),
            port,
            data: data.to_path_buf(),
            config,
            log,
            registry_host: registry.host.clone(),
            registry_username: registry.username.clone(),
            registry_password: registry.password.clone(),
            client: client_with_token(&api_token),
            api_token,
            database,
        }
    }

    /// Starts a new `stagely serve` on the same port, data and registry (a restart).
    pub async fn restart(&mut self) {
        self.child = spawn_serve(
            self.port,
            &self.data,
            &self.config,
            &self.registry_host,
            &self.registry_username,
            &self.registry_password,
            &self.api_token,
            self.log.as_deref(),
        );
        self.wait_healthy().await;
    }

    async fn wait_healthy(&mut self) {
        if let Err(status) = self.wait_healthy_or_exit().await {
            panic!("stagely serve exited ({status}) on port {}", self.port);
        }
    }

    /// Waits until this process (its token accepted: not another core on the port) answers,
    /// or until it exits.
    async fn wait_healthy_or_exit(&mut self) -> Result<(), std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(status);
            }
            let ours = self
                .client
                .get(format!("{}/api/v1/queue", self.url))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ours {
                return Ok(());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "stagely serve on port {} did not answer within 30s",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn submit(&self, repo: &TestRepo, environment: &str) -> RunView {
        self.client
            .post(format!("{}/api/v1/workflows", self.url))
            .json(&serde_json::json!({
                "repo_url": repo.url(), "commit_hash": repo.commit, "branch": "main",
                "environment_id": environment,
            }))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("submit")
            .json()
            .await
            .expect("run view")
    }

    /// Submits a run of `repo` with `stagely_yaml` given in the request.
    pub async fn submit_text(
        &self,
        repo: &TestRepo,
        environment: &str,
        stagely_yaml: &str,
    ) -> RunView {
        let response = self
            .client
            .post(format!("{}/api/v1/workflows", self.url))
            .json(&serde_json::json!({
                "repo_url": repo.url(), "commit_hash": repo.commit, "branch": "main",
                "environment_id": environment, "stagely_yaml": stagely_yaml,
            }))
            .send()
            .await
            .expect("submit");
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(status.as_u16(), 201, "submit answered {status}: {body}");
        serde_json::from_str(&body).expect("run view")
    }

    /// Every stored line of a job with the time the core stored it (unix ms).
    pub async fn log_lines(&self, job_id: &str) -> Vec<(i64, String)> {
        all_log_lines(&self.client, &self.url, job_id)
            .await
            .expect("the job's log")
            .into_iter()
            .map(|l| (l.timestamp, l.line))
            .collect()
    }

    /// Every stored line of a job with its seq.
    pub async fn seq_lines(&self, job_id: &str) -> Vec<(i64, String)> {
        all_log_lines(&self.client, &self.url, job_id)
            .await
            .expect("the job's log")
            .into_iter()
            .map(|l| (l.seq, l.line))
            .collect()
    }

    pub async fn run(&self, run_id: &str) -> RunView {
        self.client
            .get(format!("{}/api/v1/workflows/{run_id}", self.url))
            .send()
            .await
            .expect("get run")
            .json()
            .await
            .expect("run view")
    }

    /// Waits until a line of the job's log contains `text`.
    pub async fn wait_for_line(&self, job_id: &str, text: &str) {
        self.wait_for_lines(job_id, text, 1).await
    }

    /// `POST /api/v1/workflows/{id}/cancel`: (status, body).
    pub async fn cancel(&self, run_id: &str) -> (u16, serde_json::Value) {
        let response = self
            .client
            .post(format!("{}/api/v1/workflows/{run_id}/cancel", self.url))
            .send()
            .await
            .expect("cancel");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
    }

    /// Waits for the run to reach `status`.
    pub async fn wait_for_status(&self, run_id: &str, status: &str, timeout: Duration) -> RunView {
        poll_until(timeout, "the run's status", || async {
            let view: RunView = self
                .client
                .get(format!("{}/api/v1/workflows/{run_id}", self.url))
                .send()
                .await?
                .json()
                .await?;
            let seen = format!(
                "run {} [{}]",
                view.status,
                view.jobs
                    .iter()
                    .map(|j| format!(
                        "{}={} attempts={} error={:?}",
                        j.name,
                        j.status,
                        j.attempts.len(),
                        j.error_message
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(((view.status == status).then_some(view), seen))
        })
        .await
    }

    /// Waits until `count` lines of the job's log contain `text`.
    pub async fn wait_for_lines(&self, job_id: &str, text: &str, count: usize) {
        poll_until(Duration::from_secs(120), "log lines", || async {
            let page: LogPage = self
                .client
                .get(format!(
                    "{}/api/v1/jobs/{job_id}/logs?limit=10000",
                    self.url
                ))
                .send()
                .await?
                .json()
                .await?;
            let found = page.lines.iter().filter(|l| l.line.contains(text)).count() >= count;
            Ok((
                found.then_some(()),
                format!("{} line(s), job {}", page.lines.len(), page.job_status),
            ))
        })
        .await
    }

    /// SIGTERM, then wait for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let mut status = None;
        poll_until(Duration::from_secs(60), "the core to exit", || {
            let exited = self.child.try_wait().ok().flatten();
            status = status.or(exited);
            async move { Ok((exited.map(|_| ()), "still running".to_string())) }
        })
        .await;
        status.expect("exit status")
    }

    /// SIGKILL: a crash, no cleanup.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILLs every process of this core's local instances: each agent's whole session
    /// (its `unshare`, the agent, git, the builder and the build's own processes), what a
    /// service manager's restart does to the processes the core started. Returns how many
    /// sessions it killed.
    pub async fn kill_instances(&self) -> usize {
        let needle = format!("{}/", self.data.join("instances").display());
        let sessions: std::collections::BTreeSet<i32> = cmdlines()
            .into_iter()
            .filter(|(_, cmdline)| cmdline.contains(&needle))
            .filter_map(|(pid, _)| session_of(pid))
            .collect();
        poll_until(
            Duration::from_secs(20),
            "the instances' processes to die",
            || {
                let members: Vec<i32> = (cmdlines().into_iter())
                    .map(|(pid, _)| pid)
                    .filter(|pid| session_of(*pid).is_some_and(|s| sessions.contains(&s)))
                    .collect();
                for pid in &members {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(*pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let detail = format!("still alive: {members:?}");
                async move { Ok((members.is_empty().then_some(()), detail)) }
            },
        )
        .await;
        sessions.len()
    }

    /// Instance directories that still hold a live instance record or its disk.
    pub fn live_instance_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.data.join("instances"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("instance.json").exists() || p.join("work").exists())
            .collect()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_serve(
    port: u16,
    data: &Path,
    config: &Path,
    registry_host: &str,
    username: &str,
    password: &str,
    api_token: &str,
    log: Option<&Path>,
) -> std::process::Child {
    let stderr = match log.and_then(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
    }) {
        Some(file) => std::process::Stdio::from(file),
        None => std::process::Stdio::null(),
    };
    // Credentials go through the environment, never the command line.
    std::process::Command::new(agent_binary().with_file_name("stagely"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--registry", registry_host])
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .env("STAGELY_REGISTRY_USERNAME", username)
        .env("STAGELY_REGISTRY_PASSWORD", password)
        .env("STAGELY_API_TOKEN", api_token)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("stagely serve starts")
}

/// Command lines of every process (pid, argv joined by spaces).
/// The session of a live (non-zombie) process.
pub fn session_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(3)?.parse().ok()
}

pub fn cmdlines() -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(bytes) = std::fs::read(entry.path().join("cmdline")) {
            out.push((pid, String::from_utf8_lossy(&bytes).replace('\0', " ")));
        }
    }
    out
}

/// Every regular file under `dir` (symlinks are not followed).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_symlink() {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// Whether `needle` occurs in `haystack`.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Where and as whom a hand-driven agent pushes (a [`LocalRegistry`]'s address and login).
#[derive(Clone)]
pub struct RegistryAccess {
    pub host: String,
    pub username: String,
    pub password: String,
}

impl RegistryAccess {
    pub fn of(registry: &LocalRegistry) -> RegistryAccess {
        RegistryAccess {
            host: registry.host.clone(),
            username: registry.username.clone(),
            password: registry.password.clone(),
        }
    }

    /// `repository:tag` of an image reference `HOST/repository:tag` on this registry.
    pub fn split_reference<'a>(&self, image: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = image.strip_prefix(self.host.as_str())?.strip_prefix('/')?;
        rest.rsplit_once(':')
    }
}

fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Pushes a minimal image (an empty config, no layers) as `repository:tag` over the registry
/// API and returns its manifest digest: what a hand-driven agent reports as its build.
pub async fn push_test_image(
    registry: &LocalRegistry,
    repository: &str,
    tag: &str,
) -> anyhow::Result<String> {
    let client = reqwest::Client::new();
    let (digest, _) = push_minimal_image(
        &client,
        &RegistryAccess::of(registry),
        repository,
        tag,
        "amd64",
    )
    .await?;
    Ok(digest)
}

/// Pushes a minimal `linux/<arch>` image (an empty config, no layers) as `repository:tag`;
/// returns its manifest digest and size.
pub async fn push_minimal_image(
    client: &reqwest::Client,
    access: &RegistryAccess,
    repository: &str,
    tag: &str,
    arch: &str,
) -> anyhow::Result<(String, usize)> {
    let base = format!("http://{}/v2/{repository}", access.host);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []},
    }))?;
    let config_digest = sha256_digest(&config);
    let upload = client
        .post(format!("{base}/blobs/uploads/"))
        .basic_auth(&access.username, Some(&access.password))
        .send()
        .await?
        .error_for_status()?;
    let location = upload
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .context("no upload location")?
        .to_string();
    let location = if location.starts_with("http") {
        location
    } else {
        format!("http://{}{location}", access.host)
    };
    let separator = if location.contains('?') { '&' } else { '?' };
    client
        .put(format!("{location}{separator}digest={config_digest}"))
        .basic_auth(&access.username, Some(&access.password))
        .header("content-type", "application/octet-stream")
        .body(config.clone())
        .send()
        .await?
        .error_for_status()?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [],
    }))?;
    client
        .put(format!("{base}/manifests/{tag}"))
        .basic_auth(&access.username, Some(&access.password))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await?
        .error_for_status()?;
    Ok((sha256_digest(&manifest), manifest.len()))
}

/// Pushes an OCI image index as `repository:tag` whose children are the manifests
/// `(digest, size, arch)` already in `repository` (what a MERGE makes); returns its digest.
pub async fn push_minimal_index(
    client: &reqwest::Client,
    access: &RegistryAccess,
    repository: &str,
    tag: &str,
    children: &[(String, usize, String)],
) -> anyhow::Result<String> {
    let manifests: Vec<serde_json::Value> = children
        .iter()
        .map(|(digest, size, arch)| {
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest,
                "size": size,
                "platform": {"architecture": arch, "os": "linux"},
            })
        })
        .collect();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))?;
    client
        .put(format!(
            "http://{}/v2/{repository}/manifests/{tag}",
            access.host
        ))
        .basic_auth(&access.username, Some(&access.password))
        .header("content-type", "application/vnd.oci.image.index.v1+json")
        .body(index.clone())
        .send()
        .await?
        .error_for_status()?;
    Ok(sha256_digest(&index))
}

/// Every blob (config and layers) of a single-platform image, fetched over the registry API:
/// (layer digests, all bytes of manifest, config and layers, compressed and uncompressed,
/// concatenated).
pub async fn image_contents(
    registry: &LocalRegistry,
    image: &str,
) -> anyhow::Result<(Vec<String>, Vec<u8>)> {
    let client = reqwest::Client::new();
    let rest = image
        .strip_prefix(&format!("{}/", registry.host))
        .with_context(|| format!("{image} is not in {}", registry.host))?;
    let (repo, tag) = rest.rsplit_once(':').context("image has no tag")?;
    let get = |path: String| {
        client
            .get(format!("http://{}/v2/{repo}/{path}", registry.host))
            .basic_auth(&registry.username, Some(&registry.password))
            .header(
                "Accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
            )
            .send()
    };
    let manifest = get(format!("manifests/{tag}"))
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let parsed: serde_json::Value = serde_json::from_slice(&manifest)?;
    let mut all = manifest.to_vec();
    let mut layers = Vec::new();
    let config = parsed["config"]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    for layer in parsed["layers"].as_array().into_iter().flatten() {
        layers.push(layer["digest"].as_str().unwrap_or_default().to_string());
    }
    for digest in std::iter::once(&config).chain(layers.iter()) {
        let blob = get(format!("blobs/{digest}"))
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        all.extend_from_slice(&blob);
        // Layers are gzip-compressed tars: search their contents too.
        if blob.starts_with(&[0x1f, 0x8b]) {
            use std::io::Read;
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(&blob[..]).read_to_end(&mut plain)?;
            all.extend_from_slice(&plain);
        }
    }
    Ok((layers, all))
}
