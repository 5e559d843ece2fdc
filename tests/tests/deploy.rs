//! `deploy/` is what users install registry-cache with: it must render offline with
//! `kubectl kustomize`, every object must be a valid Kubernetes object with no misspelled field
//! (the API server drops unknown fields silently, so a typo in a securityContext would just
//! vanish), and the pieces must agree: probes, ports, selectors, mounts, volumes, RBAC.

use anyhow::Context as _;
use harness::crds::{yaml_docs, yaml_docs_str};
use harness::envoy::workspace_root;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    Container, Namespace, PersistentVolumeClaim, PodSpec, Probe, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

const NAMESPACE: &str = "churn-guard-system";

fn deploy_dir() -> PathBuf {
    workspace_root().join("deploy")
}

/// `kubectl kustomize deploy/`, every document. `KUBECTL` overrides the binary.
fn render() -> anyhow::Result<Vec<Value>> {
    let kubectl = std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
    let out = Command::new(&kubectl).arg("kustomize").arg(deploy_dir()).output().with_context(|| {
        format!(
            "running `{} kustomize deploy/`: kubectl is needed to render the manifests; \
             run scripts/setup.sh (installs Debian's kubernetes-client) or set KUBECTL",
            kubectl.to_string_lossy()
        )
    })?;
    anyhow::ensure!(
        out.status.success(),
        "`kubectl kustomize deploy/` failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = yaml_docs_str(&String::from_utf8(out.stdout)?)?;
    anyhow::ensure!(!docs.is_empty(), "`kubectl kustomize deploy/` rendered nothing");
    Ok(docs)
}

/// Drops nulls, which mean "unset" to Kubernetes and are never serialized back.
fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            Value::Object(m.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), without_nulls(v))).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(without_nulls).collect()),
        v => v.clone(),
    }
}

/// Where `input` and the typed round trip differ: fields the type does not know, and values
/// it reads differently.
fn differences(path: &str, input: &Value, typed: &Value, out: &mut Vec<String>) {
    match (input, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => differences(&p, v, w, out),
                    None => out.push(format!("{p}: unknown field")),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{path}.{k}: added by the type (defaulted?)"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                differences(&format!("{path}[{i}]"), v, w, out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} reads back as {b}")),
    }
}

/// Deserializes `doc` as `T`, strictly: type errors name their path, and any field `T` does not
/// know (k8s-openapi ignores them, as the API server does) is an error.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let doc = without_nulls(doc);
    let value: T = serde_path_to_error::deserialize(doc.clone()).map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
    let back = serde_json::to_value(&value).map_err(|e| e.to_string())?;
    let mut diffs = vec![];
    differences("", &doc, &back, &mut diffs);
    if diffs.is_empty() {
        Ok(value)
    } else {
        Err(diffs.join("\n"))
    }
}

/// The rendered objects, each validated strictly as the typed struct for its kind.
#[derive(Default)]
struct Rendered {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    stateful_sets: Vec<StatefulSet>,
    disruption_budgets: Vec<PodDisruptionBudget>,
    services: Vec<Service>,
    network_policies: Vec<NetworkPolicy>,
    secrets: Vec<Secret>,
}

fn strictly<T: DeserializeOwned + Serialize>(doc: &Value, into: &mut Vec<T>) -> Result<(), String> {
    into.push(typed(doc)?);
    Ok(())
}

impl Rendered {
    fn load() -> anyhow::Result<Self> {
        let mut r = Rendered::default();
        let mut errors = vec![];
        for doc in render()? {
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            let name = doc["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let api_version = doc["apiVersion"].as_str().unwrap_or_default();
            let result = match (api_version, kind.as_str()) {
                ("v1", "Namespace") => strictly(&doc, &mut r.namespaces),
                ("v1", "ServiceAccount") => strictly(&doc, &mut r.service_accounts),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => strictly(&doc, &mut r.cluster_roles),
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => strictly(&doc, &mut r.cluster_role_bindings),
                ("apps/v1", "StatefulSet") => strictly(&doc, &mut r.stateful_sets),
                ("policy/v1", "PodDisruptionBudget") => strictly(&doc, &mut r.disruption_budgets),
                ("v1", "Service") => strictly(&doc, &mut r.services),
                ("networking.k8s.io/v1", "NetworkPolicy") => strictly(&doc, &mut r.network_policies),
                ("v1", "Secret") => strictly(&doc, &mut r.secrets),
                _ => Err(format!("unexpected {api_version} {kind}: add it to this test")),
            };
            if let Err(e) = result {
                errors.push(format!("{kind} {name}:\n{e}"));
            }
        }
        anyhow::ensure!(errors.is_empty(), "invalid objects in deploy/:\n{}", errors.join("\n\n"));
        Ok(r)
    }

    fn stateful_set(&self) -> &StatefulSet {
        assert_eq!(self.stateful_sets.len(), 1, "deploy/ renders exactly one StatefulSet");
        &self.stateful_sets[0]
    }

    fn pod(&self) -> &PodSpec {
        self.stateful_set()
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("StatefulSet without a pod spec")
    }

    fn pod_labels(&self) -> BTreeMap<String, String> {
        let spec = self.stateful_set().spec.as_ref().expect("StatefulSet without spec");
        spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default()
    }

    fn container(&self) -> &Container {
        let containers = &self.pod().containers;
        assert_eq!(containers.len(), 1, "one container: registry-cache");
        &containers[0]
    }

    /// The StatefulSet's one volume claim template: each replica's own cache volume.
    fn claim_template(&self) -> &PersistentVolumeClaim {
        let spec = self.stateful_set().spec.as_ref().expect("StatefulSet without spec");
        let templates = spec.volume_claim_templates.as_deref().unwrap_or_default();
        assert_eq!(templates.len(), 1, "the StatefulSet has exactly one volume claim template");
        &templates[0]
    }
}

/// The value after `flag` in `args`, as `--flag value` or `--flag=value`.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let prefix = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(&prefix)
        }
    })
}

/// Bytes in a Kubernetes quantity such as `2Gi` or `500M` (integers only, as used here).
fn quantity_bytes(q: &str) -> u64 {
    let units = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    let (num, mult) =
        units.iter().find_map(|(suffix, mult)| q.strip_suffix(suffix).map(|n| (n, *mult))).unwrap_or((q, 1));
    num.parse::<u64>().unwrap_or_else(|_| panic!("unsupported quantity {q}")) * mult
}

/// The container port a probe or Service targets, by name or number.
fn resolve_port(container: &Container, port: &IntOrString) -> Option<i32> {
    container.ports.iter().flatten().find_map(|p| match port {
        IntOrString::Int(n) if p.container_port == *n => Some(p.container_port),
        IntOrString::String(name) if p.name.as_deref() == Some(name) => Some(p.container_port),
        _ => None,
    })
}

fn http_probe<'a>(probe: &'a Option<Probe>, what: &str) -> (&'a str, &'a IntOrString) {
    let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap_or_else(|| panic!("{what}: no httpGet probe"));
    (get.path.as_deref().unwrap_or_default(), &get.port)
}

#[test]
fn renders_offline_into_valid_objects_only() -> anyhow::Result<()> {
    let r = Rendered::load()?;
    let counts = [
        ("Namespace", r.namespaces.len()),
        ("ServiceAccount", r.service_accounts.len()),
        ("ClusterRole", r.cluster_roles.len()),
        ("ClusterRoleBinding", r.cluster_role_bindings.len()),
        ("StatefulSet", r.stateful_sets.len()),
        ("PodDisruptionBudget", r.disruption_budgets.len()),
        ("Service", r.services.len()),
        ("NetworkPolicy", r.network_policies.len()),
    ];
    for (kind, n) in counts {
        assert_eq!(n, 1, "deploy/ should render exactly one {kind}");
    }
    // A placeholder key in the base would overwrite the real one on every `kubectl apply -k`.
    assert!(r.secrets.is_empty(), "deploy/ must not render a Secret: the signing key is created by the user");

    let ns = r.namespaces[0].metadata.name.as_deref();
    assert_eq!(ns, Some(NAMESPACE));
    let pss = r.namespaces[0].metadata.labels.clone().unwrap_or_default();
    assert_eq!(pss.get("pod-security.kubernetes.io/enforce").map(String::as_str), Some("restricted"));

    let all_meta = r
        .namespaces
        .iter()
        .map(|o| ("Namespace", &o.metadata, false))
        .chain(r.service_accounts.iter().map(|o| ("ServiceAccount", &o.metadata, true)))
        .chain(r.cluster_roles.iter().map(|o| ("ClusterRole", &o.metadata, false)))
        .chain(r.cluster_role_bindings.iter().map(|o| ("ClusterRoleBinding", &o.metadata, false)))
        .chain(r.stateful_sets.iter().map(|o| ("StatefulSet", &o.metadata, true)))
        .chain(r.disruption_budgets.iter().map(|o| ("PodDisruptionBudget", &o.metadata, true)))
        .chain(r.services.iter().map(|o| ("Service", &o.metadata, true)))
        .chain(r.network_policies.iter().map(|o| ("NetworkPolicy", &o.metadata, true)));
    for (kind, meta, namespaced) in all_meta {
        let name = meta.name.as_deref().unwrap_or_default();
        if namespaced {
            assert_eq!(meta.namespace.as_deref(), Some(NAMESPACE), "{kind} {name} namespace");
        }
        let labels = meta.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("app.kubernetes.io/name").map(String::as_str), Some("registry-cache"), "{kind} {name}");
        assert_eq!(labels.get("app.kubernetes.io/part-of").map(String::as_str), Some("churn-guard"), "{kind} {name}");
    }
    Ok(())
}

#[test]
fn two_replicas_each_with_its_own_volume_one_disrupted_at_a_time() -> anyhow::Result<()> {
    let r = Rendered::load()?;
    let spec = r.stateful_set().spec.as_ref().expect("StatefulSet spec");
    assert_eq!(spec.replicas, Some(2));
    // One pod replaced at a time, the next only once the last is Ready.
    let update = spec.update_strategy.as_ref().and_then(|s| s.type_.as_deref());
    assert_eq!(update.unwrap_or("RollingUpdate"), "RollingUpdate");
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    let pod_labels = r.pod_labels();
    assert!(!selector.is_empty());
    for (k, v) in &selector {
        assert_eq!(pod_labels.get(k), Some(v), "StatefulSet selector {k}={v} does not match its pod template");
    }
    let service = r.services[0].metadata.name.as_deref();
    assert_eq!(spec.service_name.as_deref(), service, "serviceName must name a Service deploy/ creates");

    // Each replica's own ReadWriteOnce volume, from the claim template; no shared claim.
    let pvc = r.claim_template().spec.as_ref().expect("claim template spec");
    assert_eq!(pvc.access_modes.clone().unwrap_or_default(), vec!["ReadWriteOnce".to_string()]);
    let storage = pvc.resources.as_ref().and_then(|res| res.requests.as_ref()).and_then(|req| req.get("storage"));
    assert_eq!(storage.map(|q| q.0.as_str()), Some("2Gi"));
    let volumes = r.pod().volumes.clone().unwrap_or_default();
    assert!(volumes.iter().all(|v| v.persistent_volume_claim.is_none()), "a claim shared by every replica");

    // Voluntary disruptions leave one replica serving.
    let pdb = r.disruption_budgets[0].spec.as_ref().expect("PodDisruptionBudget spec");
    let max_unavailable = match (&pdb.max_unavailable, &pdb.min_available) {
        (Some(IntOrString::Int(n)), None) => *n,
        (None, Some(IntOrString::Int(n))) => 2 - *n,
        other => panic!("PodDisruptionBudget: expected an absolute maxUnavailable or minAvailable, got {other:?}"),
    };
    assert_eq!(max_unavailable, 1, "at most one of the two replicas down at a time");
    let pdb_selector = pdb.selector.as_ref().and_then(|s| s.match_labels.clone()).unwrap_or_default();
    assert!(!pdb_selector.is_empty());
    for (k, v) in &pdb_selector {
        assert_eq!(pod_labels.get(k), Some(v), "PodDisruptionBudget selector {k}={v} misses the pods");
    }

    let pod = r.pod();
    let sa = r.service_accounts[0].metadata.name.as_deref();
    assert_eq!(pod.service_account_name.as_deref(), sa);
    assert_eq!(pod.automount_service_account_token, Some(true), "the service talks to the API server");

    let image = r.container().image.as_deref().unwrap_or_default();
    let (repo, tag) = image.rsplit_once(':').unwrap_or((image, ""));
    assert_eq!(repo.trim_end_matches("@sha256"), "ghcr.io/churn-guard/registry-cache", "image {image}");
    assert!(
        !tag.is_empty() && tag != "latest",
        "image {image} must be pinned by tag or digest (kustomization images:)"
    );
    Ok(())
}

#[test]
fn container_is_locked_down_and_has_resources() -> anyhow::Result<()> {
    let r = Rendered::load()?;
    let pod = r.pod();
    let psc = pod.security_context.clone().unwrap_or_default();
    for c in pod.containers.iter().chain(pod.init_containers.iter().flatten()) {
        let name = &c.name;
        let res = c.resources.clone().unwrap_or_default();
        for (what, map) in [("requests", &res.requests), ("limits", &res.limits)] {
            let map = map.clone().unwrap_or_default();
            for resource in ["cpu", "memory"] {
                assert!(map.contains_key(resource), "container {name}: no {resource} in resources.{what}");
            }
        }
        let limit = res.limits.unwrap_or_default().get("memory").map(|q| quantity_bytes(&q.0)).unwrap_or_default();
        let request = res.requests.unwrap_or_default().get("memory").map(|q| quantity_bytes(&q.0)).unwrap_or_default();
        assert!(request <= limit, "container {name}: memory request above its limit");

        let sc = c.security_context.clone().unwrap_or_default();
        let non_root = sc.run_as_non_root.or(psc.run_as_non_root);
        assert_eq!(non_root, Some(true), "container {name}: runAsNonRoot");
        assert_ne!(sc.run_as_user.or(psc.run_as_user), Some(0), "container {name}: runs as root");
        assert_eq!(sc.read_only_root_filesystem, Some(true), "container {name}: readOnlyRootFilesystem");
        assert_eq!(sc.allow_privilege_escalation, Some(false), "container {name}: allowPrivilegeEscalation");
        assert_ne!(sc.privileged, Some(true), "container {name}: privileged");
        let caps = sc.capabilities.clone().unwrap_or_default();
        assert_eq!(caps.drop, Some(vec!["ALL".to_string()]), "container {name}: capabilities.drop");
        assert!(caps.add.unwrap_or_default().is_empty(), "container {name}: adds capabilities");
        let seccomp = sc.seccomp_profile.or(psc.seccomp_profile.clone()).map(|p| p.type_);
        assert_eq!(seccomp.as_deref(), Some("RuntimeDefault"), "container {name}: seccompProfile");
    }
    assert!(pod.host_network != Some(true) && pod.host_pid != Some(true) && pod.host_ipc != Some(true));
    Ok(())
}

#[test]
fn probes_and_service_reach_the_listening_port() -> anyhow::Result<()> {
    let r = Rendered::load()?;
    let c = r.container();
    let args = c.args.clone().unwrap_or_default();
    let listen = flag(&args, "--listen").expect("serve --listen");
    let port: i32 = listen.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).expect("--listen host:port");
    assert_eq!(port, 5000);
    assert!(c.ports.iter().flatten().any(|p| p.container_port == port), "--listen {listen} is not a containerPort");

    for (probe, what, path) in [
        (&c.liveness_probe, "livenessProbe", "/healthz"),
        (&c.readiness_probe, "readinessProbe", "/readyz"),
        (&c.startup_probe, "startupProbe", "/healthz"),
    ] {
        let (got_path, probe_port) = http_probe(probe, what);
        assert_eq!(got_path, path, "{what} path");
        // The cache serves TLS only; a plain HTTP probe would get 400 and fail the pod.
        let scheme = probe.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|g| g.scheme.as_deref());
        assert_eq!(scheme, Some("HTTPS"), "{what} must probe with HTTPS");
        assert_eq!(resolve_port(c, probe_port), Some(port), "{what} port {probe_port:?} is not the --listen port");
    }

    let svc = &r.services[0];
    let spec = svc.spec.as_ref().expect("Service spec");
    assert_eq!(spec.type_.as_deref().unwrap_or("ClusterIP"), "ClusterIP");
    let selector = spec.selector.clone().unwrap_or_default();
    assert!(!selector.is_empty(), "Service without selector");
    let pod_labels = r.pod_labels();
    for (k, v) in &selector {
        assert_eq!(pod_labels.get(k), Some(v), "Service selector {k}={v} does not match the StatefulSet's pods");
    }
    let ports = spec.ports.clone().unwrap_or_default();
    assert_eq!(ports.len(), 1);
    assert_eq!((ports[0].name.as_deref(), ports[0].port), (Some("http"), 5000));
    let target = ports[0].target_port.clone().unwrap_or(IntOrString::Int(ports[0].port));
    assert_eq!(resolve_port(c, &target), Some(port), "Service targetPort {target:?} is not the container's port");

    // `registry-cache render` points Envoy Gateway at this Service by default.
    let url =
        format!("https://{}.{NAMESPACE}.svc.cluster.local:{}", svc.metadata.name.as_deref().unwrap_or_default(), 5000);
    let main = std::fs::read_to_string(workspace_root().join("registry-cache/src/main.rs"))?;
    assert!(main.contains(&url), "registry-cache's default --base-url is not the Service's address {url}");
    Ok(())
}

#[test]
fn args_use_mounted_paths() -> anyhow::Result<()> {
    let r = Rendered::load()?;
    let pod = r.pod();
    let c = r.container();
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("serve"));
    assert!(args.iter().any(|a| a == "--watch-kubernetes"), "serve must watch EnvoyExtensionPolicies");

    let mounts = c.volume_mounts.clone().unwrap_or_default();
    let volumes = pod.volumes.clone().unwrap_or_default();
    let claim_name = r.claim_template().metadata.name.clone().unwrap_or_default();
    for m in &mounts {
        let found = volumes.iter().any(|v| v.name == m.name) || m.name == claim_name;
        assert!(found, "volumeMount {} has no volume", m.name);
    }
    let mount_of = |path: &str| {
        mounts
            .iter()
            .filter(|m| path == m.mount_path || path.starts_with(&format!("{}/", m.mount_path.trim_end_matches('/'))))
            .max_by_key(|m| m.mount_path.len())
            .cloned()
    };
    // With a read-only root filesystem, every path the service is given must be on a volume.
    for a in &args {
        let path = a.split_once('=').map_or(a.as_str(), |(_, v)| v);
        if path.starts_with('/') {
            assert!(mount_of(path).is_some(), "argument {a}: {path} is on no volumeMount");
        }
    }
    let volume = |name: &str| volumes.iter().find(|v| v.name == name).cloned().expect("volume");

    let cache_dir = flag(&args, "--cache-dir").expect("--cache-dir");
    let cache_mount = mount_of(cache_dir).expect("cache mount");
    assert_ne!(cache_mount.read_only, Some(true), "the cache must be writable");
    assert_eq!(cache_mount.name, claim_name, "--cache-dir {cache_dir} is not on the replica's own volume");

    let max = flag(&args, "--max-cache-bytes").expect("--max-cache-bytes sized to the volume");
    let template = r.claim_template().spec.as_ref();
    let storage = template.and_then(|s| s.resources.as_ref()).and_then(|res| res.requests.clone());
    let storage = storage.unwrap_or_default().get("storage").map(|q| quantity_bytes(&q.0)).unwrap_or_default();
    assert!(max.parse::<u64>()? < storage, "--max-cache-bytes {max} does not fit the {storage}-byte volume");

    // Both keys come from the one Secret, mounted read-only, and the pod needs it to start.
    let mut secret_keys = vec![];
    let mut secrets = vec![];
    for option in ["--signing-key", "--url-key"] {
        let key = flag(&args, option).unwrap_or_else(|| panic!("{option}"));
        let key_mount = mount_of(key).unwrap_or_else(|| panic!("{option} mount"));
        assert_eq!(key_mount.read_only, Some(true), "{option} must be mounted read-only");
        let secret = volume(&key_mount.name).secret.unwrap_or_else(|| panic!("{option} is not on a Secret volume"));
        let file = key.strip_prefix(&format!("{}/", key_mount.mount_path)).expect("key file under its mount");
        // With `items`, only the listed keys become files: the file must be one of them.
        let projected = match &secret.items {
            Some(items) => items.iter().find(|i| i.path == file).map(|i| i.key.clone()),
            None => Some(file.to_string()),
        };
        let Some(secret_key) = projected else {
            panic!("{option} {key}: the Secret volume does not project {file}, so the pod cannot start")
        };
        secret_keys.push(secret_key);
        assert_ne!(secret.optional, Some(true), "without the key the pod must not start");
        secrets.push(secret);
    }
    let secret = secrets.remove(0);
    assert!(secrets.iter().all(|s| s.secret_name == secret.secret_name), "the keys come from one Secret");
    // Extra keys read from Secrets (the password of an encrypted cosign key) come from the same
    // Secret, and are optional.
    for env in c.env.iter().flatten() {
        if let Some(r) = env.value_from.as_ref().and_then(|f| f.secret_key_ref.as_ref()) {
            assert_eq!(Some(&r.name), secret.secret_name.as_ref(), "env {} from another Secret", env.name);
            assert_eq!(r.optional, Some(true), "env {} must be optional", env.name);
        }
    }

    // The TLS pair comes from a kubernetes.io/tls Secret (tls.crt, tls.key) the pod needs to
    // start, and cert-manager.example.yaml makes that Secret, for the Service's DNS name.
    assert!(!args.iter().any(|a| a == "--plain-http"), "the shipped cache must serve TLS");
    let mut tls_secrets = vec![];
    for (option, file) in [("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")] {
        let path = flag(&args, option).unwrap_or_else(|| panic!("{option}"));
        let mount = mount_of(path).unwrap_or_else(|| panic!("{option} mount"));
        assert_eq!(mount.read_only, Some(true), "{option} must be mounted read-only");
        let secret = volume(&mount.name).secret.unwrap_or_else(|| panic!("{option} is not on a Secret volume"));
        let projected = path.strip_prefix(&format!("{}/", mount.mount_path)).expect("file under its mount");
        let key = match &secret.items {
            Some(items) => items.iter().find(|i| i.path == projected).map(|i| i.key.clone()),
            None => Some(projected.to_string()),
        };
        assert_eq!(key.as_deref(), Some(file), "{option} must be the Secret's {file}");
        assert_ne!(secret.optional, Some(true), "without the certificate the pod must not start");
        tls_secrets.push(secret.secret_name.unwrap_or_default());
    }
    assert_eq!(tls_secrets[0], tls_secrets[1], "certificate and key come from one Secret");
    let cert_manager = yaml_docs(&deploy_dir().join("cert-manager.example.yaml"))?;
    let leaf = cert_manager
        .iter()
        .find(|d| d["kind"] == "Certificate" && d["spec"]["secretName"] == tls_secrets[0].as_str())
        .unwrap_or_else(|| panic!("cert-manager.example.yaml makes no Certificate for Secret {}", tls_secrets[0]));
    let service_dns =
        format!("{}.{NAMESPACE}.svc.cluster.local", r.services[0].metadata.name.as_deref().unwrap_or_default());
    assert!(
        leaf["spec"]["dnsNames"].as_array().into_iter().flatten().any(|n| n == service_dns.as_str()),
        "the certificate does not name {service_dns}"
    );
    assert!(cert_manager.iter().all(|d| d["metadata"]["namespace"] == NAMESPACE));
    let readme = std::fs::read_to_string(deploy_dir().join("README.md"))?;
    assert!(readme.contains(&format!("secret generic {}", tls_secrets[0])), "README does not say how to create it");

    // The documented example Secret is the one the StatefulSet mounts, with that key.
    let example = deploy_dir().join("signing-key-secret.example.yaml");
    let docs = yaml_docs(&example)?;
    assert_eq!(docs.len(), 1);
    let example: Secret = typed(&docs[0]).map_err(|e| anyhow::anyhow!("{}:\n{e}", example.display()))?;
    assert_eq!(example.metadata.name, secret.secret_name);
    assert_eq!(example.metadata.namespace.as_deref(), Some(NAMESPACE));
    let string_data = example.string_data.unwrap_or_default();
    let readme = std::fs::read_to_string(deploy_dir().join("README.md"))?;
    let name = secret.secret_name.unwrap_or_default();
    assert!(readme.contains(&format!("create secret generic {name}")), "README does not say how to create {name}");
    for secret_key in &secret_keys {
        assert!(string_data.contains_key(secret_key), "example Secret lacks the key {secret_key}");
        assert!(readme.contains(&format!("--from-file={secret_key}=")), "README does not name the key {secret_key}");
    }
    Ok(())
}

#[test]
fn rbac_grants_only_what_the_service_uses() -> anyhow::Result<()> {
    let r = Rendered::load()?;
    let role = &r.cluster_roles[0];
    assert!(role.aggregation_rule.is_none());
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.non_resource_urls.is_none(), "no non-resource URLs");
        assert!(rule.resource_names.is_none(), "resourceNames: not expected");
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        for list in [&groups, &resources, &rule.verbs] {
            assert!(!list.iter().any(|s| s.contains('*')), "wildcard in {rule:?}");
        }
        for g in &groups {
            for res in &resources {
                for v in &rule.verbs {
                    granted.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    let expected: BTreeSet<_> = [
        ("gateway.envoyproxy.io", "envoyextensionpolicies", "get"),
        ("gateway.envoyproxy.io", "envoyextensionpolicies", "list"),
        ("gateway.envoyproxy.io", "envoyextensionpolicies", "watch"),
        // `get` reads any Secret by name (deploy/README.md says so); list and watch would
        // also enumerate them all, and are not granted.
        ("", "secrets", "get"),
    ]
    .into_iter()
    .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
    .collect();
    assert_eq!(granted, expected);

    let binding = &r.cluster_role_bindings[0];
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects: Vec<_> =
        binding.subjects.iter().flatten().map(|s| (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref())).collect();
    let sa = r.service_accounts[0].metadata.name.as_deref().unwrap_or_default();
    assert_eq!(subjects, vec![("ServiceAccount", sa, Some(NAMESPACE))]);
    Ok(())
}

#[test]
fn network_policy_admits_envoy_gateway_on_the_service_port_only() -> anyhow::Result<()> {
    let r = Rendered::load()?;
    let np = r.network_policies[0].spec.clone().expect("NetworkPolicy spec");
    let pod_labels = r.pod_labels();
    let selected = np.pod_selector.and_then(|s| s.match_labels).unwrap_or_default();
    assert!(!selected.is_empty(), "NetworkPolicy selects every pod in the namespace");
    for (k, v) in &selected {
        assert_eq!(pod_labels.get(k), Some(v), "NetworkPolicy podSelector {k}={v} misses the pod");
    }
    assert_eq!(np.policy_types, Some(vec!["Ingress".to_string()]));
    let ingress = np.ingress.unwrap_or_default();
    assert!(!ingress.is_empty());
    for rule in ingress {
        let ports: Vec<_> = rule.ports.iter().flatten().map(|p| p.port.clone()).collect();
        assert_eq!(ports, vec![Some(IntOrString::Int(5000))], "ingress on port 5000 only");
        let peers = rule.from.unwrap_or_default();
        assert!(!peers.is_empty(), "an ingress rule without `from` admits everyone");
        for peer in peers {
            assert!(peer.ip_block.is_none());
            // kustomize's commonLabels writes this app's labels into peers' matchLabels, which
            // would turn "Envoy proxies" into "nothing".
            let peer_labels = peer.pod_selector.and_then(|s| s.match_labels).unwrap_or_default();
            assert!(!peer_labels.contains_key("app.kubernetes.io/name"), "peer selector rewritten by commonLabels");
        }
    }
    Ok(())
}

/// The strict check really catches what the API server would silently drop.
#[test]
fn strict_validation_catches_typos() -> anyhow::Result<()> {
    let workload = render()?.into_iter().find(|d| d["kind"] == "StatefulSet").expect("a StatefulSet");
    assert!(typed::<StatefulSet>(&workload).is_ok());

    let mut typo = workload.clone();
    typo["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = Value::Bool(true);
    let err = typed::<StatefulSet>(&typo).expect_err("a misspelled securityContext field passed");
    assert!(err.contains("securityContext.readOnlyRootFileSystem: unknown field"), "{err}");

    let mut wrong_type = workload;
    wrong_type["spec"]["replicas"] = Value::String("one".into());
    let err = typed::<StatefulSet>(&wrong_type).expect_err("replicas: \"one\" passed");
    assert!(err.contains("spec.replicas"), "{err}");
    Ok(())
}
