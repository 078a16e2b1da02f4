//! The function's child process: spawning, log capture, and the signals that freeze, thaw and
//! end it.

use std::io;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::watch;

use super::FunctionSpec;

/// Every line the child wrote to stdout or stderr, in arrival order.
#[derive(Debug)]
pub(crate) struct LogSink {
    lines: Mutex<Vec<String>>,
    /// The number of lines so far, so tests can await a line without polling.
    count: watch::Sender<usize>,
    echo: bool,
}

impl LogSink {
    pub(crate) fn new() -> Self {
        Self {
            lines: Mutex::new(Vec::new()),
            count: watch::channel(0).0,
            echo: std::env::var("TESTKIT_ECHO").is_ok_and(|v| v == "1"),
        }
    }

    fn push(&self, line: String) {
        if self.echo {
            eprintln!("[function] {line}");
        }
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.push(line);
        let n = lines.len();
        drop(lines);
        self.count.send_replace(n);
    }

    pub(crate) fn snapshot(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }
}

/// A running child, as the emulator's state keeps it.
#[derive(Debug)]
pub(crate) struct ChildProcess {
    pub(crate) pid: Pid,
    /// Becomes `Some` once the child has exited and been reaped.
    pub(crate) exit: watch::Receiver<Option<ExitStatus>>,
}

/// Starts `spec` with the given environment (added to the inherited one, after `remove`d
/// variables are dropped), pipes its output into `logs`, and reaps it in a task that calls
/// `on_exit` once it has exited.
pub(crate) fn spawn(
    spec: &FunctionSpec,
    env: Vec<(String, String)>,
    remove: &[&str],
    logs: Arc<LogSink>,
    on_exit: impl FnOnce(Pid, Option<ExitStatus>) + Send + 'static,
) -> io::Result<ChildProcess> {
    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // The child must never outlive the emulator's runtime.
        .kill_on_drop(true);
    for name in remove {
        command.env_remove(name);
    }
    command.envs(env);
    command.envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut child = command.spawn()?;
    let raw = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .ok_or_else(|| io::Error::other("the child exited before its pid was known"))?;
    let pid = Pid::from_raw(raw);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump(out, logs.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pump(err, logs));
    }
    let (exit_tx, exit) = watch::channel(None);
    tokio::spawn(async move {
        let status = child.wait().await.ok();
        exit_tx.send_replace(status);
        on_exit(pid, status);
    });
    Ok(ChildProcess { pid, exit })
}

async fn pump(stream: impl AsyncRead + Unpin, logs: Arc<LogSink>) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    buf.pop();
                }
                logs.push(String::from_utf8_lossy(&buf).into_owned());
            }
        }
    }
}

/// Sends `signal` to the child. Returns false when the process is already gone.
pub(crate) fn signal(pid: Pid, signal: Signal) -> bool {
    kill(pid, signal).is_ok()
}

/// Freezes the child: Lambda freezes an idle environment, so nothing in it runs until the next
/// invoke ("Lambda execution environment lifecycle": the environment is frozen between
/// invocations).
pub(crate) fn freeze(pid: Pid) -> bool {
    signal(pid, Signal::SIGSTOP)
}

/// Thaws a frozen child.
pub(crate) fn thaw(pid: Pid) -> bool {
    signal(pid, Signal::SIGCONT)
}

/// Kills the child at once, as Lambda does on a timeout reset.
pub(crate) fn kill_now(pid: Pid) -> bool {
    signal(pid, Signal::SIGKILL)
}

/// Asks the child to stop (shutdown phase).
pub(crate) fn terminate(pid: Pid) -> bool {
    signal(pid, Signal::SIGTERM)
}
