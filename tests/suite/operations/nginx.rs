//! nginx for the side-by-side operations runs, as it runs in production (daemonized, a master
//! and one worker), reloaded with `nginx -s reload` and upgraded with USR2, WINCH and QUIT, as
//! nginx.org/en/docs/control.html says.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{signal, Which, RELOAD_LIMIT};
use crate::support::backend::Backend;
use crate::support::{closed_port, poll_until};

pub fn nginx_binary() -> Option<&'static str> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// nginx as it runs in production: daemonized, a master process (the one a reload or an upgrade
/// signals, found in its pid file) and one worker; stopped on drop.
pub struct Nginx {
    binary: &'static str,
    /// The master in charge; a binary upgrade replaces it.
    master: u32,
    /// The process group of every master and worker (the first master's, which `setsid` made).
    group: u32,
    port: SocketAddr,
    upstreams: (SocketAddr, SocketAddr),
    dir: tempfile::TempDir,
}

impl Nginx {
    pub async fn start(binary: &'static str, a: &Backend, b: &Backend) -> Nginx {
        let dir = tempfile::tempdir().expect("nginx temp dir");
        // Workers drop root privileges to nginx's default user: let them into the directory.
        let _ = std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        );
        let (port, upstreams) = (closed_port(), (a.addr(), b.addr()));
        let conf = dir.path().join("nginx.conf");
        std::fs::write(
            &conf,
            Nginx::conf_text(dir.path(), port, upstreams, Which::A),
        )
        .expect("writing nginx.conf");
        // The absolute path matters: a binary upgrade re-executes argv[0].
        let status = Command::new(binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("starting nginx");
        assert!(status.success(), "nginx did not start: {status}");
        let pid_file = dir.path().join("nginx.pid");
        let master = poll_until(Duration::from_secs(10), || async {
            let listening = tokio::net::TcpStream::connect(port).await.is_ok();
            let pid = read_pid(&pid_file)?;
            listening.then_some(pid)
        })
        .await
        .expect("nginx did not start listening");
        Nginx {
            binary,
            master,
            group: master,
            port,
            upstreams,
            dir,
        }
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("nginx.conf")
    }

    fn error_log(&self) -> PathBuf {
        self.dir.path().join("error.log")
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.port)
    }

    /// One worker, keep-alive to the clients (75 s) and to the backend, no access log, every
    /// path in `dir`; `/` goes to "a" or "b" (or the file has an unknown directive).
    fn conf_text(
        dir: &Path,
        port: SocketAddr,
        upstreams: (SocketAddr, SocketAddr),
        which: Which,
    ) -> String {
        let d = dir.display();
        let (server, broken) = match which {
            Which::A => (upstreams.0, ""),
            Which::B => (upstreams.1, ""),
            // The upstream stays valid; one unknown directive breaks the file.
            Which::Broken => (upstreams.0, "  this_is_not_a_directive on;\n"),
        };
        format!(
            "worker_processes 1;\nmaster_process on;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_timeout 75s;\n{broken}\
             client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             upstream app {{\n    server {server};\n    keepalive 128;\n  }}\n\
             server {{\n    listen {port};\n    location / {{\n      proxy_pass http://app;\n\
             proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
        )
    }

    fn write(&self, which: Which) {
        let text = Nginx::conf_text(self.dir.path(), self.port, self.upstreams, which);
        std::fs::write(self.conf(), text).expect("writing nginx.conf");
    }

    /// `nginx -s reload`: the signaller parses the file, then sends SIGHUP to the master.
    fn signal_reload(&self) -> std::process::Output {
        Command::new(self.binary)
            .arg("-p")
            .arg(self.dir.path())
            .arg("-c")
            .arg(self.conf())
            .args(["-e", "stderr", "-s", "reload"])
            .stdin(Stdio::null())
            .output()
            .expect("running nginx -s reload")
    }

    /// The master's worker processes, old and new.
    fn workers(&self) -> usize {
        children(self.master).len()
    }

    /// Waits until the master has a single worker: the old ones have exited.
    pub async fn until_one_worker(&self) {
        let deadline = Instant::now() + RELOAD_LIMIT;
        while self.workers() != 1 {
            assert!(
                Instant::now() < deadline,
                "nginx still has {} workers",
                self.workers()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn emergencies(&self) -> usize {
        std::fs::read_to_string(self.error_log())
            .unwrap_or_default()
            .matches("[emerg]")
            .count()
    }

    /// Reloads once; `true` if the new config went in force, `false` if it was refused.
    ///
    /// A broken file never reaches the master through `nginx -s reload`: the signaller parses it
    /// first and exits 1. So it is also sent as SIGHUP to the master, as a deploy that signals
    /// the pid would, and the master must refuse it and keep its workers.
    pub async fn reload(&self, which: Which, refused_by_signaller: &mut usize) -> bool {
        self.write(which);
        let before = self.emergencies();
        let out = self.signal_reload();
        if which != Which::Broken {
            assert!(
                out.status.success(),
                "nginx -s reload: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return true;
        }
        if !out.status.success() {
            *refused_by_signaller += 1;
        }
        signal(self.master, "HUP");
        let refused = poll_until(RELOAD_LIMIT, || async {
            (self.emergencies() > before).then_some(())
        })
        .await;
        assert!(
            refused.is_some(),
            "the master did not report the broken config"
        );
        false
    }
}

impl Nginx {
    /// nginx's binary upgrade (nginx.org/en/docs/control.html#upgrade), with the other config in
    /// the file: USR2 makes the master start its binary again, which inherits the listening
    /// sockets and writes its pid file; WINCH makes the old master's workers finish and exit;
    /// QUIT ends the old master.
    pub async fn upgrade(&mut self, which: Which) {
        self.write(which);
        let old = self.master;
        let pid_file = self.dir.path().join("nginx.pid");
        signal(old, "USR2");
        let new = poll_until(RELOAD_LIMIT, || async {
            let pid = read_pid(&pid_file).filter(|&p| p != old)?;
            (!children(pid).is_empty()).then_some(pid)
        })
        .await
        .expect("nginx: no new master with a worker after USR2");
        signal(old, "WINCH");
        // The old master's children are its workers and the new master.
        let workers_gone = poll_until(RELOAD_LIMIT, || async {
            children(old).iter().all(|&p| p == new).then_some(())
        })
        .await;
        assert!(
            workers_gone.is_some(),
            "nginx: the old workers did not exit after WINCH"
        );
        signal(old, "QUIT");
        let exited = poll_until(RELOAD_LIMIT, || async { gone(old).then_some(()) }).await;
        assert!(
            exited.is_some(),
            "nginx: the old master did not exit after QUIT"
        );
        self.master = new;
    }
}

/// The pid in an nginx pid file.
fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The live (not zombie) children of process `pid`, from /proc: `PID (COMM) STATE PPID ...`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parent = pid.to_string();
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                return false;
            };
            let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let mut fields = after.split_whitespace();
            let state = fields.next();
            state != Some("Z") && fields.next() == Some(parent.as_str())
        })
        .collect()
}

/// True once process `pid` is gone, or a zombie (reparented processes may wait for a reaper
/// that is not us).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers, then exits. SIGKILL on the group if it hangs.
        let _ = Command::new("kill")
            .args(["-TERM", &self.master.to_string()])
            .status();
        for _ in 0..500 {
            if gone(self.master) && children(self.master).is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.group)])
            .status();
    }
}
