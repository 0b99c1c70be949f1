//! A throwaway Distribution registry (`docker-registry` from Debian) for `stagely run`
//! and the tests: loopback only, htpasswd auth with a random password, storage in a
//! temporary directory. It stops (and its images vanish) when dropped.

use std::path::Path;
use std::time::Duration;

use tokio::process::Child;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "`docker-registry` is not installed (apt-get install docker-registry, or run scripts/setup.sh)"
    )]
    NotInstalled,
    #[error("preparing the registry: {0}")]
    Io(#[from] std::io::Error),
    #[error("hashing the registry password: {0}")]
    Hash(#[from] bcrypt::BcryptError),
    #[error("the registry did not become ready on {host}: {detail}")]
    NotReady { host: String, detail: String },
}

/// A running registry.
pub struct LocalRegistry {
    /// `127.0.0.1:PORT` (or the address given to [`LocalRegistry::start_on`]).
    pub host: String,
    pub username: String,
    /// Random; given to the core through its config, never on a command line.
    pub password: String,
    /// The registry process; killed on drop.
    child: Child,
    /// Storage, config and htpasswd; removed on drop.
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for LocalRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRegistry")
            .field("host", &self.host)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut buffer = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buffer);
    hex::encode(buffer)
}

impl LocalRegistry {
    /// Starts a registry on a free loopback port and waits until it answers.
    pub async fn start() -> Result<LocalRegistry, RegistryError> {
        Self::start_on("127.0.0.1").await
    }

    /// Like [`LocalRegistry::start`], listening on `ip` (a test network's host address, so
    /// builders in network namespaces reach it).
    pub async fn start_on(ip: &str) -> Result<LocalRegistry, RegistryError> {
        let found = stagely_server::source::child_command("docker-registry")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await;
        if !found.is_ok_and(|status| status.success()) {
            return Err(RegistryError::NotInstalled);
        }
        let username = "stagely".to_string();
        let password = random_hex(24);
        // The registry checks the hash on every request: a low cost keeps pushes fast, and
        // the password is random and lives as long as this process.
        let hash = bcrypt::hash(&password, 5)?;
        let mut last_error = String::new();
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("stagely-registry-")
                .tempdir()?;
            let port = free_port()?;
            let host = format!("{ip}:{port}");
            std::fs::write(dir.path().join("htpasswd"), format!("{username}:{hash}\n"))?;
            let config = render_config(dir.path(), &host, &random_hex(16));
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, config)?;
            let log = std::fs::File::create(dir.path().join("registry.log"))?;
            let child = stagely_server::source::child_command("docker-registry")
                .arg("serve")
                .arg(&config_path)
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()?;
            let mut registry = LocalRegistry {
                host,
                username: username.clone(),
                password: password.clone(),
                child,
                dir,
            };
            match registry.wait_ready().await {
                Ok(()) => return Ok(registry),
                Err(detail) => {
                    last_error = detail;
                    let _ = registry.child.kill().await;
                }
            }
        }
        Err(RegistryError::NotReady {
            host: "127.0.0.1".into(),
            detail: last_error,
        })
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let url = format!("http://{}/v2/", self.host);
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(self.dir.path().join("registry.log"))
                    .unwrap_or_default();
                let tail: String = log.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
                return Err(format!("exited with {status}: {tail}"));
            }
            // Unauthenticated /v2/ answers 401 once the registry serves.
            if let Ok(response) = client.get(&url).send().await
                && response.status() == reqwest::StatusCode::UNAUTHORIZED
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err("no answer within 15s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Where the registry keeps its files (config, log, storage).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn render_config(dir: &Path, host: &str, secret: &str) -> String {
    format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n\
         http:\n  addr: {host}\n  secret: {secret}\n\
         auth:\n  htpasswd:\n    realm: stagely\n    path: {htpasswd}\n",
        root = dir.join("data").display(),
        htpasswd = dir.join("htpasswd").display(),
    )
}
