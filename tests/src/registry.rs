//! A real private OCI registry on loopback: Debian's `docker-registry` (CNCF distribution)
//! with htpasswd auth, in a temporary directory that goes with it.

use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct DockerRegistry {
    child: Child,
    pub addr: SocketAddr,
    pub user: String,
    pub password: String,
    dir: tempfile::TempDir,
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl DockerRegistry {
    /// Starts a registry that accepts only `user`/`password`, and waits until it answers.
    pub async fn start(user: &str, password: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("docker-registry").tempdir()?;
        let htpasswd = Command::new("htpasswd")
            .args(["-Bbn", user, password])
            .output()
            .context("htpasswd (Debian package apache2-utils; `make setup` installs it)")?;
        anyhow::ensure!(htpasswd.status.success(), "htpasswd failed");
        std::fs::write(dir.path().join("htpasswd"), &htpasswd.stdout)?;
        let addr = free_addr()?;
        let config = format!(
            "version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {root}}}}}\n\
             http: {{addr: {addr}}}\nauth: {{htpasswd: {{realm: churn-guard, path: {ht}}}}}\n",
            root = dir.path().join("data").display(),
            ht = dir.path().join("htpasswd").display(),
        );
        std::fs::write(dir.path().join("config.yml"), config)?;
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(dir.path().join("registry.log"))?));
        // The registry must not outlive the process that started it, whatever happens to it.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child =
            cmd.spawn().context("docker-registry (Debian package docker-registry; `make setup` installs it)")?;
        let registry = Self { child, addr, user: user.into(), password: password.into(), dir };
        for _ in 0..200 {
            if let Ok(r) = reqwest::get(format!("http://{addr}/v2/")).await {
                anyhow::ensure!(r.status() == 401, "the registry must require credentials, got {}", r.status());
                return Ok(registry);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("docker-registry did not start: {}", registry.log())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// A Docker `config.json` holding this registry's credentials.
    pub fn docker_config(&self) -> String {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", self.user, self.password));
        serde_json::json!({"auths": {self.addr.to_string(): {"auth": auth}}}).to_string()
    }

    /// The same credentials as a `kubernetes.io/dockerconfigjson` Secret in `namespace`.
    pub fn pull_secret(&self, namespace: &str, name: &str) -> String {
        use base64::Engine as _;
        let data = base64::engine::general_purpose::STANDARD.encode(self.docker_config());
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\n\
             type: kubernetes.io/dockerconfigjson\ndata:\n  .dockerconfigjson: {data}\n"
        )
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }
}
