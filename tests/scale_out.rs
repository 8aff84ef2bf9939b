//! Beyond one machine: replicas that share named adapters through S3-compatible storage
//! (moto's S3, `scripts/s3_server.py`), behind HAProxy with adapter affinity
//! (`deploy/haproxy.cfg`). Real processes on loopback.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use serde_json::{json, Value};
use ttrl_serve::adapt::store::{conformance, AdapterStore, ObjectAdapterStore};

use crate::common::scratch_dir;
use crate::common::server::{arithmetic_training, free_port, logprobs, Server};

const BUCKET: &str = "ttrl";

fn wait_until_up(url: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while ureq::get(url).call().map(|r| r.status()).ok() != Some(200) {
        assert!(Instant::now() < deadline, "{what} did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An S3-compatible server with one bucket, killed when dropped.
struct S3 {
    child: Child,
    endpoint: String,
}

impl S3 {
    fn start() -> S3 {
        let Ok(python) = std::env::var("TTRL_TEST_PYTHON") else {
            panic!(
                "TTRL_TEST_PYTHON must name a python with moto[server] (scripts/test.sh sets it)"
            );
        };
        let port = free_port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/s3_server.py");
        let child = Command::new(python)
            .arg(script)
            .args([port.to_string(), BUCKET.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the S3 server starts");
        let s3 = S3 {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        wait_until_up(&format!("{}/{BUCKET}", s3.endpoint), "the S3 server");
        s3
    }

    /// The variables a replica reads to reach it.
    fn configure(&self, command: &mut Command) {
        command
            .env("AWS_ENDPOINT", &self.endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test");
    }

    fn store(&self, prefix: &str) -> ObjectAdapterStore {
        let client = AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_bucket_name(BUCKET)
            .build()
            .unwrap();
        ObjectAdapterStore::new(Arc::new(client), prefix, "SmolLM2-135M-Instruct", 3).unwrap()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_s3_backend_keeps_the_store_contract() {
    let s3 = S3::start();
    conformance::run(&|| Box::new(s3.store("contract")));
}

/// Quick real training on the default model (as in the durability tests); replicas read the
/// store's pointer again after half a second.
const TRAIN: &str = "[engine]\ntrainer_nice = 0\n[adapters]\nrefresh_seconds = 0.5\n\
    [adaptation]\nsamples = 6\nmax_tokens = 40\nkl_bound = 100.0\nmin_majority_votes = 2\n";

fn replica(s3: &S3, dir: &Path, prefix: &str, index: usize) -> Server {
    let settings = dir.join("settings.toml");
    std::fs::write(&settings, TRAIN).unwrap();
    let data = dir.join(format!("replica-{index}"));
    let store = format!("s3://{BUCKET}/{prefix}");
    Server::start_with(
        &[
            "--config",
            settings.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--adapter-store",
            &store,
        ],
        |command| s3.configure(command),
    )
}

/// The adaptation report of one adapted request sent to `base`, and the replica that
/// answered it when a proxy says.
fn train(base: &str, adapter: &str, i: usize) -> Option<(Value, Option<String>)> {
    let r = ureq::post(&format!("{base}/v1/chat/completions"))
        .set("x-ttrl-adapter", adapter)
        .send_json(arithmetic_training(adapter, i))
        .ok()?;
    let replica = r.header("x-ttrl-replica").map(String::from);
    let body: Value = r.into_json().ok()?;
    Some((body["adaptation"].clone(), replica))
}

/// Greedy token log-probs of a fixed question with the named adapter.
fn greedy_logprobs(server: &Server, adapter: &str) -> Vec<f64> {
    let (status, r) = server.post(
        "/v1/chat/completions",
        &json!({
            "model": format!("SmolLM2-135M-Instruct:{adapter}"),
            "messages": [{"role": "user", "content": "What is 4 plus 4? Answer with just the number."}],
            "max_tokens": 6, "temperature": 0.0, "logprobs": true,
        }),
    );
    assert_eq!(status, 200, "{r}");
    logprobs(&r)
}

#[test]
fn two_replicas_racing_on_one_adapter_publish_every_version_once() {
    let dir = scratch_dir("scale-out-race");
    let s3 = S3::start();
    let replicas = [replica(&s3, &dir, "race", 0), replica(&s3, &dir, "race", 1)];
    let mut published: Vec<u64> = Vec::new();
    let mut lost = 0;
    for round in 0..5 {
        let reports: Vec<Value> = std::thread::scope(|scope| {
            let handles: Vec<_> = replicas
                .iter()
                .map(|r| {
                    let base = r.base.clone();
                    scope.spawn(move || train(&base, "shared", round).expect("an answer").0)
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Winners first: a loser answers with a version its round published.
        let mut reports = reports;
        reports.sort_by_key(|r| r["applied"] != true);
        for report in &reports {
            let version = report["adapter_version"].as_u64().unwrap();
            let note = report["note"].as_str().unwrap_or_default();
            eprintln!(
                "round {round}: applied {} v{} -> v{version} {note}",
                report["applied"], report["adapter_version_before"]
            );
            if report["applied"] == true {
                assert!(
                    !published.contains(&version),
                    "version {version} published twice: {published:?}"
                );
                published.push(version);
            } else if note.contains("another replica published") {
                lost += 1;
                assert!(
                    published.contains(&version),
                    "the loser answers with the winner's version {version}: {published:?}"
                );
            }
        }
    }
    assert!(lost >= 1, "the replicas never raced: {published:?}");
    let mut sorted = published.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), published.len());
    let store = s3.store("race");
    assert_eq!(
        store.current("shared").unwrap(),
        sorted.last().copied(),
        "the store's current version is the newest one published"
    );
    // Both replicas serve the newest version: one trained it, the other read it from the
    // store. The same greedy log-probs mean the store holds what the winner trained.
    std::thread::sleep(Duration::from_secs(1)); // past refresh_seconds
    let (a, b) = (
        greedy_logprobs(&replicas[0], "shared"),
        greedy_logprobs(&replicas[1], "shared"),
    );
    assert_eq!(a, b, "both replicas answer with the same weights");
    let _ = std::fs::remove_dir_all(dir);
}

/// HAProxy with `deploy/haproxy.cfg`, in the foreground, killed when dropped.
struct Proxy {
    child: Child,
    base: String,
}

impl Proxy {
    /// In front of `replicas` (host:port each), which it calls r1, r2, ... in that order.
    fn start(replicas: &[String]) -> Proxy {
        let port = free_port();
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy.cfg");
        let mut command = Command::new("haproxy");
        command
            .args(["-db", "-f"])
            .arg(config)
            .env("TTRL_PROXY_BIND", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (i, address) in replicas.iter().enumerate() {
            command.env(format!("TTRL_REPLICA_{}", i + 1), address);
        }
        let child = command
            .spawn()
            .expect("haproxy starts (scripts/test.sh installs it)");
        let proxy = Proxy {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        wait_until_up(&format!("{}/ready", proxy.base), "the proxy");
        proxy
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_killed_replicas_adapters_are_served_by_another_at_their_last_version() {
    let dir = scratch_dir("scale-out-failover");
    let s3 = S3::start();
    let mut replicas: Vec<Option<Server>> = (0..3)
        .map(|i| Some(replica(&s3, &dir, "failover", i)))
        .collect();
    let addresses: Vec<String> = replicas
        .iter()
        .flatten()
        .map(|r| r.base.trim_start_matches("http://").to_string())
        .collect();
    let proxy = Proxy::start(&addresses);
    // Train through the proxy until a version is published; affinity keeps one replica.
    let mut told = 0;
    let mut seen = Vec::new();
    for i in 0..8 {
        let (report, replica) = train(&proxy.base, "tenant-x", i).expect("an answer");
        told = told.max(report["adapter_version"].as_u64().unwrap());
        seen.push(replica.expect("the proxy names the replica"));
        if told >= 2 {
            break;
        }
    }
    assert!(told >= 1, "no step applied in 8 rounds");
    assert!(
        seen.iter().all(|r| *r == seen[0]),
        "one adapter's requests meet on one replica: {seen:?}"
    );
    let index: usize = seen[0].trim_start_matches('r').parse::<usize>().unwrap() - 1;
    // Plain requests with the adapter keep coming while the replica dies: the proxy sends
    // the ones it refuses or drops to another replica, so none fails.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (served, failed) = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            let (mut served, mut failed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = ureq::post(&format!("{}/v1/chat/completions", proxy.base))
                    .set("x-ttrl-adapter", "tenant-x")
                    .send_json(json!({
                        "model": "SmolLM2-135M-Instruct:tenant-x",
                        "messages": [{"role": "user", "content": "What is 2 plus 2?"}],
                        "max_tokens": 4,
                    }));
                match r {
                    Ok(_) => served += 1,
                    Err(e) => {
                        eprintln!("plain request failed: {e}");
                        failed += 1;
                    }
                }
            }
            (served, failed)
        });
        std::thread::sleep(Duration::from_millis(500));
        replicas[index].take().unwrap().kill();
        std::thread::sleep(Duration::from_secs(5));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        traffic.join().unwrap()
    });
    assert!(
        served > 0 && failed == 0,
        "{served} served, {failed} failed"
    );
    let killed = Instant::now();
    let mut after = Vec::new();
    for i in 10..13 {
        let answer = loop {
            if let Some(answer) = train(&proxy.base, "tenant-x", i) {
                break answer;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "the adapter was not served again"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        if after.is_empty() {
            eprintln!(
                "trained again {:.2} s after the plain traffic, by {:?}",
                killed.elapsed().as_secs_f64(),
                answer.1
            );
        }
        after.push(answer);
    }
    for (report, replica) in &after {
        assert_ne!(replica.as_deref(), Some(seen[0].as_str()));
        assert!(
            report["adapter_version_before"].as_u64().unwrap() >= told,
            "a version older than one already told ({told}): {report}"
        );
        told = told.max(report["adapter_version"].as_u64().unwrap());
    }
    let _ = std::fs::remove_dir_all(dir);
}
