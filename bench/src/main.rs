//! `churn-lab`: the demo and the benchmarks.

use churn_lab::demo::{self, DemoOptions};
use churn_lab::pods::{Protocol, RolloutSpec, Termination};
use churn_lab::report::{self, Summary};
use churn_lab::scenario::{self, Load, RunResult, Scenario, Timeouts};
use churn_lab::variants::Variant;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Rounds of S3's saturation runs (`run_interleaved`).
const SATURATION_ROUNDS: usize = 3;

#[derive(Parser)]
#[command(about = "Rolling restarts behind real Envoy, with and without churn-guard")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A short rolling restart, first without then with churn-guard, on loopback.
    Demo {
        #[arg(long, default_value_t = 30)]
        pods: usize,
        /// How late the control plane tells Envoy about endpoint changes, in seconds.
        #[arg(long, default_value_t = 10)]
        lag: u64,
        #[arg(long, default_value_t = 300)]
        rate: u32,
        #[arg(long, default_value = "target/demo")]
        out: PathBuf,
    },
    /// Scenarios S1-S5 for every configuration; writes table, CSV and charts.
    Bench {
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        #[arg(long, value_delimiter = ',', value_enum, default_value = "s1,s2,s3,s4,s5,s6")]
        scenarios: Vec<ScenarioName>,
    },
    /// What a configuration costs against another: both gateways on the same pods, saturated
    /// (or at `--rate`) in short slices, in turn or at once, so that the host's drifting speed
    /// affects both alike.
    Compare {
        #[arg(long, value_enum, default_value = "wasm-noop")]
        base: Variant,
        #[arg(long, value_enum)]
        other: Variant,
        /// Rounds, each on freshly started gateways.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Pairs of slices per round.
        #[arg(long, default_value_t = 10)]
        pairs: usize,
        /// Seconds per slice.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Requests per second to each gateway, instead of saturating them: compares latency.
        #[arg(long, conflicts_with = "concurrency")]
        rate: Option<u32>,
        /// Load both at once (half the clients each when saturating, the full rate each with
        /// `--rate`) rather than in turn.
        #[arg(long)]
        simultaneous: bool,
    },
    /// registry-cache: permission answer latency, blob throughput against docker-registry,
    /// pre-pull wall time.
    RegistryBench {
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// Seconds of load per blob size and server.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// One scenario with chosen configurations and parameters.
    Run {
        #[arg(long, value_enum, default_value_t = ScenarioName::S1)]
        scenario: ScenarioName,
        #[arg(long, value_delimiter = ',', value_enum)]
        variants: Vec<Variant>,
        #[arg(long)]
        pods: Option<usize>,
        #[arg(long)]
        lag: Option<u64>,
        #[arg(long)]
        rate: Option<u32>,
        /// Closed loop with this many clients instead of a fixed rate.
        #[arg(long)]
        concurrency: Option<usize>,
        #[arg(long, value_enum)]
        termination: Option<TerminationArg>,
        #[arg(long, default_value = "target/churn-lab")]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ScenarioName {
    S1,
    S2,
    S3,
    S4,
    S5,
    S6,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TerminationArg {
    Graceful,
    Abrupt,
    Vanish,
    Mixed,
}

fn rollout(replicas: usize, termination: Termination) -> RolloutSpec {
    RolloutSpec {
        replicas,
        max_surge: 0.25,
        max_unavailable: 0.25,
        readiness_delay: Duration::from_secs(3),
        termination,
    }
}

/// S1, the reported outage: 100 pods, default strategy, control plane 30 s late.
fn s1() -> Scenario {
    Scenario {
        name: "S1".into(),
        replicas: 100,
        termination: Termination::Graceful,
        rollout: Some(rollout(100, Termination::Graceful)),
        lag: Duration::from_secs(30),
        batch: Duration::from_secs(1),
        load: Load::Open { rate: 500 },
        warmup: Duration::from_secs(8),
        settle: Duration::from_secs(5),
        steady_for: Duration::ZERO,
        per_try_timeout: None,
        connect_timeout: None,
        tuned_timeouts: None,
        protocol: Protocol::Http,
    }
}

/// S2: pods vanish without a reset; connects and requests in flight time out.
fn s2() -> Scenario {
    let mut s = s1();
    s.name = "S2".into();
    s.replicas = 50;
    s.termination = Termination::Vanish;
    s.rollout = Some(rollout(50, Termination::Vanish));
    s.load = Load::Open { rate: 300 };
    // Requests already sent on a connection to a vanished pod hang; only a per-try timeout
    // lets any retry policy move them elsewhere before the route times out.
    s.per_try_timeout = Some(Duration::from_secs(2));
    // A user facing vanishing pods also shortens the connect timeout, for every configuration.
    s.connect_timeout = Some(Duration::from_secs(2));
    s
}

/// S3: steady state, no churn: what the filter costs.
fn s3(load: Load, name: &str) -> Scenario {
    Scenario {
        name: name.into(),
        replicas: 10,
        termination: Termination::Graceful,
        rollout: None,
        lag: Duration::ZERO,
        batch: Duration::from_secs(1),
        load,
        warmup: Duration::from_secs(3),
        settle: Duration::ZERO,
        steady_for: Duration::from_secs(20),
        per_try_timeout: None,
        connect_timeout: None,
        tuned_timeouts: None,
        protocol: Protocol::Http,
    }
}

/// S4, partial staleness: the control plane is a few seconds late, but less late than a new
/// pod takes to become ready, so Envoy's endpoint list always holds live pods beside dead ones;
/// half the dead pods refuse and drain, half reset.
fn s4() -> Scenario {
    let mut s = s1();
    s.name = "S4".into();
    s.replicas = 40;
    s.termination = Termination::Mixed;
    // New pods take longer to become ready than Envoy takes to hear of them (3 s lag, 1 s
    // batches), so the list always holds live pods: the last old ones, or the first new ones.
    s.rollout = Some(RolloutSpec { readiness_delay: Duration::from_secs(5), ..rollout(40, Termination::Mixed) });
    s.lag = Duration::from_secs(3);
    s
}

/// S5: S4's rollout, but dead pods vanish without a reset. Envoy Gateway's default timeouts
/// (10 s connect, none per try) for every configuration but `builtin-tuned+timeouts` and the
/// recipe, which get what a user facing vanishing pods would set.
fn s5() -> Scenario {
    let mut s = s4();
    s.name = "S5".into();
    s.termination = Termination::Vanish;
    if let Some(r) = s.rollout.as_mut() {
        r.termination = Termination::Vanish;
    }
    s.load = Load::Open { rate: 300 };
    s.tuned_timeouts = Some(Timeouts { connect: Duration::from_secs(1), per_try: Duration::from_secs(1) });
    s
}

/// S6: S4's rollout for gRPC: unary calls over h2c, through Envoy Gateway's HTTP/2 upstream
/// settings. Half the dead pods GOAWAY and refuse, half reset their connections.
fn s6() -> Scenario {
    let mut s = s4();
    s.name = "S6".into();
    s.replicas = 20;
    if let Some(r) = s.rollout.as_mut() {
        r.replicas = 20;
    }
    s.load = Load::Open { rate: 300 };
    s.protocol = Protocol::Grpc;
    s
}

/// The configurations S4 and S5 compare: S1's, and in S5 the tuned native baseline too.
fn rollout_variants(with_tuned_timeouts: bool) -> Vec<Variant> {
    let mut v = Variant::ALL.to_vec();
    if with_tuned_timeouts {
        v.insert(3, Variant::BuiltinTunedTimeouts);
    }
    v
}

fn say(line: &str) {
    eprintln!("{line}");
}

/// Saturation figures drift with whatever else shares the machine, by a tenth or more from one
/// minute to the next. Each configuration runs once per round, rounds interleaved (ABC ABC
/// ABC), and the run with its median throughput stands for it: a slow minute does not fall on
/// one configuration alone, and every figure in its row comes from that one run.
async fn run_interleaved(scenario: &Scenario, variants: &[Variant], rounds: usize) -> anyhow::Result<Vec<RunResult>> {
    let mut runs: Vec<Vec<RunResult>> = variants.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (v, runs) in variants.iter().zip(runs.iter_mut()) {
            say(&format!("== {} with {} (round {round} of {rounds})", scenario.name, v.name()));
            runs.push(scenario::run(scenario, *v, &say).await?);
        }
    }
    Ok(runs
        .into_iter()
        .filter_map(|mut runs| {
            runs.sort_by(|a, b| report::summarize(a).steady_rps.total_cmp(&report::summarize(b).steady_rps));
            let median = runs.len() / 2;
            runs.into_iter().nth(median)
        })
        .collect())
}

/// Rounds per comparison in `paired_costs` and `paired_latency` (each on freshly started
/// gateways), pairs of slices per round, and their lengths.
const ROUNDS: usize = 5;
const PAIRS: usize = 4;
const PAIR_SLICE: Duration = Duration::from_secs(2);
const LATENCY_SLICE: Duration = Duration::from_secs(4);

/// The configurations compared in S3c and S3d, each against the no-op filter on its gateway;
/// first the no-op against itself, whose distance from even is the method's own error.
const PAIRED: [(Variant, Variant); 5] = [
    (Variant::WasmNoop, Variant::WasmNoop),
    (Variant::WasmNoop, Variant::WasmRetryFloor),
    (Variant::WasmNoop, Variant::ChurnGuard),
    (Variant::WasmNoop, Variant::ChurnGuardOverride),
    (Variant::WasmNoopFallback, Variant::ChurnGuardFallback),
];

/// A paired row's verdict; the no-op against itself has none, it shows the method's error.
fn verdict_cell(base: Variant, other: Variant, met: bool) -> &'static str {
    match (base == other, met) {
        (true, _) => "(error)",
        (false, true) => "met",
        (false, false) => "**missed**",
    }
}

/// S3c: each churn-guard configuration and the no-op filter on the same gateway, both loaded at
/// once in slices (`churn-lab compare --simultaneous`): the host's drift, which moves separate
/// runs by more than the filter costs, then affects both alike; and in rounds on fresh
/// processes, since one Envoy can outrun an identical one for its whole life.
async fn paired_costs(scenario: &Scenario) -> anyhow::Result<String> {
    let Load::Closed { concurrency } = scenario.load else { anyhow::bail!("paired costs need a closed loop") };
    let mut md = format!(
        "\n## S3c the filter's own cost, paired\n\nEach configuration and the no-op filter on the same \
         gateway, both loaded at once ({} clients each) for {PAIRS} slices of {} s, in {ROUNDS} rounds each on \
         freshly started gateways; medians over the slices. The no-op against itself shows the method's own \
         error. \
         `wasm-retry-floor` makes only the host calls any filter that retries by request headers and learns \
         from every answer needs (the method; `x-envoy-retry-on` and `x-envoy-max-retries`; status and attempt \
         count); churn-guard's calm path reads no answer. \
         Command: `churn-lab compare --other VARIANT --base BASE --simultaneous --rounds {ROUNDS} --pairs {PAIRS} \
         --seconds {}`.\n\n\
         | configuration | against | throughput, side by side | ≥ 85% | Envoy CPU per request | the filter's own |\n\
         |---|---|---:|---|---:|---:|\n",
        concurrency / 2,
        PAIR_SLICE.as_secs(),
        PAIR_SLICE.as_secs()
    );
    for (base, other) in PAIRED {
        say(&format!("== S3c {} against {}", other.name(), base.name()));
        let c = churn_lab::compare::compare(scenario, base, other, ROUNDS, PAIRS, PAIR_SLICE, true).await?;
        let ratio = 100.0 * c.median_ratio();
        md.push_str(&format!(
            "| {} | {} | {ratio:.1}% | {} | {:.1} µs against {:.1} µs | {:+.1} µs ({:+.0}%) |\n",
            other.name(),
            base.name(),
            verdict_cell(base, other, ratio >= 85.0),
            c.other.1.envoy_cpu_us_per_request(),
            c.base.1.envoy_cpu_us_per_request(),
            c.median_extra_cpu_us(),
            100.0 * c.median_extra_cpu_share()
        ));
    }
    Ok(md)
}

/// S3d: latency at a fixed rate, each configuration and the no-op filter both at that rate at
/// once, in short slices: the p99 of separate runs minutes apart, and even of slices in turn,
/// moves with whatever else the host runs by more than the filter adds to it; at once, both
/// gateways meet the same interference.
async fn paired_latency(scenario: &Scenario) -> anyhow::Result<String> {
    let Load::Open { rate } = scenario.load else { anyhow::bail!("paired latency needs a fixed rate") };
    let mut md = format!(
        "\n## S3d latency at {rate} requests/s, paired\n\nEach configuration and the no-op filter on the same \
         gateway, both loaded at once at {rate} requests/s each for {PAIRS} slices of {} s, in {ROUNDS} rounds \
         each on freshly started gateways. p99 over all of a \
         configuration's slices, and the median of the slice-by-slice differences. \
         Command: `churn-lab compare --other VARIANT --base BASE --rate {rate} --simultaneous --rounds {ROUNDS} \
         --pairs {PAIRS} --seconds {}`.\n\n\
         | configuration | against | p99 | added p99 | ≤ 0.1 ms | added p99, median of pairs | added p50 | Envoy CPU per request |\n\
         |---|---|---:|---:|---|---:|---:|---:|\n",
        LATENCY_SLICE.as_secs(),
        LATENCY_SLICE.as_secs()
    );
    for (base, other) in PAIRED {
        say(&format!("== S3d {} against {}", other.name(), base.name()));
        let c = churn_lab::compare::compare(scenario, base, other, ROUNDS, PAIRS, LATENCY_SLICE, true).await?;
        let (b, o) = (&c.base.1, &c.other.1);
        let added = o.p99_ms() - b.p99_ms();
        md.push_str(&format!(
            "| {} | {} | {:.2} ms against {:.2} ms | {added:+.2} ms | {} | {:+.2} ms | {:+.3} ms | {:.1} µs against {:.1} µs |\n",
            other.name(),
            base.name(),
            o.p99_ms(),
            b.p99_ms(),
            verdict_cell(base, other, added <= 0.1),
            c.median_extra_p99_ms(),
            o.p50_ms() - b.p50_ms(),
            o.envoy_cpu_us_per_request(),
            b.envoy_cpu_us_per_request()
        ));
    }
    Ok(md)
}

async fn run_all(scenario: &Scenario, variants: &[Variant]) -> anyhow::Result<Vec<RunResult>> {
    let mut out = vec![];
    for v in variants {
        say(&format!("== {} with {}", scenario.name, v.name()));
        out.push(scenario::run(scenario, *v, &say).await?);
    }
    Ok(out)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string()))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(String::new(), |kb| format!("{:.0} GiB", kb as f64 / 1048576.0));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let envoy = harness::envoy::envoy_bin()
        .ok()
        .and_then(|b| std::process::Command::new(b).arg("--version").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().replace('\n', " "))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem} memory, Linux {}; {envoy}", kernel.trim())
}

fn write_results(out: &Path, command: &str, sections: &[(String, Vec<RunResult>)], notes: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let mut md = format!(
        "# Churn lab results\n\nProduced by `{command}` on {} (UTC date {}).\n\nMachine: {}\n\n",
        hostname(),
        today(),
        machine()
    );
    let mut all = vec![];
    let mut all_summaries = vec![];
    for (title, results) in sections {
        let summaries: Vec<Summary> = results.iter().map(report::summarize).collect();
        all_summaries.extend(summaries.iter().cloned());
        let chart = format!("{}.svg", title.split_whitespace().next().unwrap_or("chart").to_lowercase());
        std::fs::write(out.join(&chart), report::svg(title, results))?;
        md.push_str(&format!(
            "## {title}\n\n![{title}]({chart})\n\n{}\nInside Envoy (from its stats):\n\n{}\n",
            report::table(&summaries),
            report::inside_table(results)
        ));
        all.extend(results.iter().cloned());
    }
    md.push_str(notes);
    md.push('\n');
    md.push_str(&report::targets(&all_summaries));
    std::fs::write(out.join("results.md"), md)?;
    std::fs::write(out.join("results.csv"), report::csv(&all))?;
    say(&format!("results in {}", out.display()));
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

async fn demo(pods: usize, lag: u64, rate: u32, out: &Path) -> anyhow::Result<()> {
    let options = DemoOptions { pods, lag: Duration::from_secs(lag), rate };
    say("churn-guard demo: everything on loopback, no cluster");
    let outcome = demo::run(&options, &say).await?;
    let summaries: Vec<Summary> = outcome.results.iter().map(report::summarize).collect();
    std::fs::create_dir_all(out)?;
    let chart = out.join("chart.svg");
    std::fs::write(
        &chart,
        report::svg("Rolling restart behind Envoy: without and with churn-guard", &outcome.results),
    )?;
    std::fs::write(out.join("rendered-policy.yaml"), &outcome.delivery.rendered_policy)?;
    let d = &outcome.delivery;
    println!(
        "\nfilter image {} (manifest {}), served by registry-cache as sha256 {}: fetched by Envoy {} times, \
         signature verified: {}",
        d.image, d.manifest_digest, d.module_sha256, outcome.modules_served, d.signature_verified
    );
    println!("\n{}", report::table(&summaries));
    println!("chart: {}", chart.display());
    println!("rendered policy: {}", out.join("rendered-policy.yaml").display());
    Ok(())
}

async fn bench(out: &Path, scenarios: &[ScenarioName]) -> anyhow::Result<()> {
    let mut sections = vec![];
    let mut notes = String::new();
    for name in scenarios {
        match name {
            ScenarioName::S1 => {
                sections.push((
                    "S1 rolling restart, 100 pods, control plane 30 s late".to_string(),
                    run_all(&s1(), &Variant::ALL).await?,
                ));
            }
            ScenarioName::S2 => {
                sections.push((
                    "S2 pods vanish without a reset (connect timeouts)".to_string(),
                    run_all(&s2(), &Variant::ALL).await?,
                ));
            }
            ScenarioName::S4 => {
                sections.push((
                    "S4 partial staleness: control plane 3 s late, pods refuse or reset".to_string(),
                    run_all(&s4(), &rollout_variants(false)).await?,
                ));
            }
            ScenarioName::S5 => {
                sections.push((
                    "S5 partial staleness, pods vanish without a reset".to_string(),
                    run_all(&s5(), &rollout_variants(true)).await?,
                ));
            }
            ScenarioName::S6 => {
                sections.push((
                    "S6 gRPC: S4's rollout with unary calls over h2c, 20 pods".to_string(),
                    run_all(&s6(), &rollout_variants(false)).await?,
                ));
            }
            ScenarioName::S3 => {
                let variants = [
                    Variant::Plain,
                    Variant::WasmNoop,
                    Variant::ChurnGuard,
                    Variant::ChurnGuardOverride,
                    Variant::WasmNoopFallback,
                    Variant::ChurnGuardFallback,
                ];
                let fixed = s3(Load::Open { rate: 500 }, "S3-fixed-rate");
                sections.push((
                    "S3a steady state at 500 requests/s (latency)".to_string(),
                    run_all(&fixed, &variants).await?,
                ));
                let mut saturated = s3(Load::Closed { concurrency: 32 }, "S3-saturation");
                saturated.steady_for = Duration::from_secs(12);
                sections.push((
                    format!(
                        "S3b steady state at saturation, 32 clients (throughput; median of {SATURATION_ROUNDS} \
                         interleaved rounds)"
                    ),
                    run_interleaved(&saturated, &variants, SATURATION_ROUNDS).await?,
                ));
                notes.push_str(&format!(
                    "\nS3 runs the load generator, Envoy (2 workers) and the upstreams on the same 2 cores, so \
                     saturation figures are relative: compare configurations, not absolute numbers. Each \
                     configuration ran {SATURATION_ROUNDS} times for 12 s, in interleaved rounds; its row is \
                     the run with the median throughput.\n"
                ));
                notes.push_str(&paired_costs(&saturated).await?);
                notes.push_str(&paired_latency(&fixed).await?);
            }
        }
    }
    let names: Vec<String> = scenarios.iter().map(|s| format!("{s:?}").to_lowercase()).collect();
    let command = format!("make bench (churn-lab bench --scenarios {})", names.join(","));
    write_results(out, &command, &sections, &notes)
}

fn main() -> anyhow::Result<()> {
    // Costs are measured at the log level a production gateway runs, not with the filter's
    // per-request debug lines, unless logs are kept for reading. Set before any thread starts.
    if std::env::var_os("ENVOY_WASM_LOG_LEVEL").is_none() && std::env::var_os("CHURN_LAB_KEEP_LOGS").is_none() {
        std::env::set_var("ENVOY_WASM_LOG_LEVEL", "info");
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let work = async {
        match cli.command {
            Command::Demo { pods, lag, rate, out } => demo(pods, lag, rate, &out).await,
            Command::Bench { out, scenarios } => bench(&out, &scenarios).await,
            Command::RegistryBench { out, seconds } => {
                let mut md = churn_lab::registry_bench::run(seconds).await?;
                md.push_str(&format!(
                    "\nProduced by `make bench` (churn-lab registry-bench --seconds {seconds}) on {} (UTC date {}).\n\nMachine: {}\n",
                    hostname(),
                    today(),
                    machine()
                ));
                std::fs::create_dir_all(&out)?;
                std::fs::write(out.join("registry-cache.md"), &md)?;
                print!("{md}");
                Ok(())
            }
            Command::Compare { base, other, rounds, pairs, seconds, concurrency, rate, simultaneous } => {
                let load = rate.map_or(Load::Closed { concurrency }, |rate| Load::Open { rate });
                let s = s3(load, "S3-compare");
                let c = churn_lab::compare::compare(
                    &s,
                    base,
                    other,
                    rounds,
                    pairs,
                    Duration::from_secs(seconds),
                    simultaneous,
                )
                .await?;
                for (v, served) in [&c.base, &c.other] {
                    println!(
                        "{:<22} {:>9.0} ok/s  {:>7.1} µs Envoy CPU/request  p50 {:.2} ms  p99 {:.2} ms  ({} failed)",
                        v.name(),
                        served.ok_per_second(),
                        served.envoy_cpu_us_per_request(),
                        served.p50_ms(),
                        served.p99_ms(),
                        served.failed
                    );
                }
                println!(
                    "{} against {}, median of {} paired slices: throughput {:.3}, Envoy CPU per request {:+.1} µs \
                     ({:+.1}%), p50 {:+.3} ms, p99 {:+.3} ms",
                    other.name(),
                    base.name(),
                    c.ratios.len(),
                    c.median_ratio(),
                    c.median_extra_cpu_us(),
                    100.0 * c.median_extra_cpu_share(),
                    c.median_extra_p50_ms(),
                    c.median_extra_p99_ms()
                );
                Ok(())
            }
            Command::Run { scenario, variants, pods, lag, rate, concurrency, termination, out } => {
                let mut s = match scenario {
                    ScenarioName::S1 => s1(),
                    ScenarioName::S2 => s2(),
                    ScenarioName::S3 => s3(Load::Open { rate: 500 }, "S3"),
                    ScenarioName::S4 => s4(),
                    ScenarioName::S5 => s5(),
                    ScenarioName::S6 => s6(),
                };
                if let Some(p) = pods {
                    s.replicas = p;
                    if let Some(r) = s.rollout.as_mut() {
                        r.replicas = p;
                    }
                }
                if let Some(l) = lag {
                    s.lag = Duration::from_secs(l);
                }
                if let Some(r) = rate {
                    s.load = Load::Open { rate: r };
                }
                if let Some(c) = concurrency {
                    s.load = Load::Closed { concurrency: c };
                }
                if let Some(t) = termination {
                    let t = match t {
                        TerminationArg::Graceful => Termination::Graceful,
                        TerminationArg::Abrupt => Termination::Abrupt,
                        TerminationArg::Vanish => Termination::Vanish,
                        TerminationArg::Mixed => Termination::Mixed,
                    };
                    s.termination = t;
                    if let Some(r) = s.rollout.as_mut() {
                        r.termination = t;
                    }
                }
                let variants =
                    if variants.is_empty() { rollout_variants(s.tuned_timeouts.is_some()) } else { variants };
                let results = run_all(&s, &variants).await?;
                write_results(&out, &std::env::args().collect::<Vec<_>>().join(" "), &[(s.name.clone(), results)], "")
            }
        }
    };
    // Ctrl-C drops everything in flight: Envoy, the registry, pods and iptables rules go with it.
    tokio::select! {
        result = work => return result,
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("interrupted; Envoy, the registry and the pods are stopped");
    std::process::exit(130)
}
