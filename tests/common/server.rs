//! A real `ttrl-serve serve` process on a free loopback port, killed when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Server {
    child: Child,
    pub base: String,
    /// The process's own `XDG_DATA_HOME`: a server started without `--data-dir` keeps its
    /// adapters here, never in the user's data folder.
    data_home: std::path::PathBuf,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// Starts the server with `args` and waits (bounded) until /ready answers 200.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with(args, |_| {})
    }

    /// [`Server::start`] with a last say over the command (environment, process limits).
    /// A port found free can be taken before the server binds it (another test's connection
    /// may get it as its local port): a server that exits before it is ready is started
    /// again on another port.
    pub fn start_with(args: &[&str], configure: impl Fn(&mut Command)) -> Server {
        for _ in 0..3 {
            if let Some(server) = Server::spawn(args, &configure).ready() {
                return server;
            }
        }
        panic!("the server exited before it was ready, three times (see its stderr above)");
    }

    fn spawn(args: &[&str], configure: &impl Fn(&mut Command)) -> Server {
        let port = free_port();
        let data_home =
            std::env::temp_dir().join(format!("ttrl-test-home-{}-{port}", std::process::id()));
        let mut command = Command::new(env!("CARGO_BIN_EXE_ttrl-serve"));
        command
            .env("XDG_DATA_HOME", &data_home)
            .arg("serve")
            .args(["--port", &port.to_string()])
            .args(args)
            .env("RUST_LOG", "warn,tower_http=off")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        configure(&mut command);
        Server {
            child: command.spawn().expect("the server binary starts"),
            base: format!("http://127.0.0.1:{port}"),
            data_home,
        }
    }

    /// Waits (bounded) until /ready answers 200; None when the process exits first.
    fn ready(mut self) -> Option<Server> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return None;
            }
            // Bounded: a port held by a process that never answers must not hang the wait.
            let ready = ureq::get(&self.url("/ready"))
                .timeout(Duration::from_secs(5))
                .call();
            if ready.is_ok_and(|r| r.status() == 200) {
                return Some(self);
            }
            assert!(Instant::now() < deadline, "server did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The tiny llama checkpoint: fast, for behaviour that does not need knowledge.
    pub fn tiny(extra: &[&str]) -> Server {
        let dir = super::fixture_dir("llama");
        let mut args = vec!["--model", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        Server::start(&args)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// POSTs JSON; returns (status, body) for success and error statuses alike.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        match ureq::post(&self.url(path)).send_json(body.clone()) {
            Ok(r) => (r.status(), r.into_json().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap()),
            Err(e) => panic!("{e}"),
        }
    }

    pub fn get_text(&self, path: &str) -> String {
        ureq::get(&self.url(path))
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    }

    /// Streams a request and returns every `data:` payload, `[DONE]` included.
    pub fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = ureq::post(&self.url(path)).send_json(body.clone()).unwrap();
        BufReader::new(r.into_reader())
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }

    /// Waits for the process to exit by itself (bounded) and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Server {
    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_home);
    }
}

/// The text content of every chunk of a chat stream, in order.
pub fn stream_text(chunks: &[String]) -> String {
    chunks
        .iter()
        .filter(|c| c.as_str() != "[DONE]")
        .filter_map(|c| serde_json::from_str::<Value>(c).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

/// The sum of a metric's samples in Prometheus text whose labels include `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// The chosen tokens' log-probs of a chat response's first choice.
pub fn logprobs(r: &Value) -> Vec<f64> {
    r["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["logprob"].as_f64().unwrap())
        .collect()
}

/// Question `i` of a rotation of small sums, adapting `adapter`: one question alone soon has
/// every leaf agreeing, and then no step applies.
pub fn arithmetic_training(adapter: &str, i: usize) -> Value {
    let (a, b) = (2 + i % 7, 3 + i % 5);
    serde_json::json!({
        "messages": [{"role": "user", "content": format!("What is {a} plus {b}? Answer with just the number.")}],
        "max_tokens": 2, "seed": i,
        "adaptation": {"enabled": true, "adapter": adapter},
    })
}
