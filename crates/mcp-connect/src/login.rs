//! The browser step of `login`: the [`AuthorizationHook`] that always prints the authorization
//! URL, opens the system browser when there is one, and shows a spinner with the time left while
//! stderr is a terminal.

use std::io::{IsTerminal as _, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mcp_clock::{Clock as _, SharedClock};

use connection_factory::{AuthorizationHook, AuthorizationRequest, HookDecision};
use flow_state::CancellationToken;

/// The prefix of the stderr line that carries the authorization URL (scripts and tests look
/// for it).
pub const AUTHORIZATION_URL_PREFIX: &str = "Authorization URL: ";

/// The environment variable that turns the browser off (any non-empty value but `0`).
pub const NO_BROWSER_ENV: &str = "MCP_CONNECT_NO_BROWSER";

/// How `login` (and `proxy`, when it has to log in) runs the browser step.
///
/// ```
/// use mcp_connect::LoginOptions;
/// use std::time::Duration;
///
/// let options = LoginOptions::default().port(0).timeout(Duration::from_secs(30)).open_browser(false);
/// # drop(options);
/// ```
#[derive(Debug, Clone)]
pub struct LoginOptions {
    pub(crate) port: Option<u16>,
    pub(crate) timeout: Duration,
    pub(crate) open_browser: bool,
    pub(crate) host: CallbackHost,
    pub(crate) callback_path: String,
    pub(crate) silent: bool,
}

/// The loopback host named in the redirect URI (mcp-remote's `--host`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallbackHost {
    /// `127.0.0.1` (the default, as RFC 8252 recommends).
    V4,
    /// `localhost` (mcp-remote's default; the listener is on 127.0.0.1).
    Localhost,
    /// `[::1]`.
    V6,
}

impl CallbackHost {
    /// How the host appears in the redirect URI.
    pub(crate) fn in_url(self) -> &'static str {
        match self {
            CallbackHost::V4 => "127.0.0.1",
            CallbackHost::Localhost => "localhost",
            CallbackHost::V6 => "[::1]",
        }
    }

    /// The address the listener binds.
    pub(crate) fn bind(self) -> std::net::IpAddr {
        match self {
            CallbackHost::V4 | CallbackHost::Localhost => std::net::Ipv4Addr::LOCALHOST.into(),
            CallbackHost::V6 => std::net::Ipv6Addr::LOCALHOST.into(),
        }
    }
}

impl Default for LoginOptions {
    /// The callback port of the stored client, else one derived from the server URL
    /// ([`callback_port_for`](crate::callback_port_for)), 120 s for the browser step, the browser on unless `MCP_CONNECT_NO_BROWSER` is set.
    fn default() -> Self {
        let off = std::env::var(NO_BROWSER_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
        LoginOptions {
            port: None,
            timeout: Duration::from_secs(120),
            open_browser: !off,
            host: CallbackHost::V4,
            callback_path: "/callback".into(),
            silent: false,
        }
    }
}

impl LoginOptions {
    /// The loopback port the callback listens on (0: any free port), instead of the stored
    /// client's or the one derived from the server URL.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The host of the redirect URI: `127.0.0.1` (default), `localhost` or `::1` (mcp-remote's
    /// `--host`; the callback only ever listens on loopback).
    ///
    /// # Errors
    /// [`Error::Usage`](crate::Error::Usage) for any other host.
    pub fn host(mut self, host: &str) -> Result<Self, crate::Error> {
        self.host = match host {
            "127.0.0.1" => CallbackHost::V4,
            "localhost" => CallbackHost::Localhost,
            "::1" | "[::1]" => CallbackHost::V6,
            other => {
                return Err(crate::Error::Usage(format!(
                    "--host {other:?}: the callback listens on loopback only (127.0.0.1, localhost or ::1)"
                )));
            }
        };
        Ok(self)
    }

    /// The path of the redirect URI (default `/callback`; mcp-remote's is `/oauth/callback`).
    ///
    /// # Errors
    /// [`Error::Usage`](crate::Error::Usage) unless it starts with `/` and has no query,
    /// fragment or route syntax (`*`, `:`, `{`, `}`).
    pub fn callback_path(mut self, path: &str) -> Result<Self, crate::Error> {
        if !path.starts_with('/') || path.contains(['?', '#', '*', '{', '}', ':']) {
            return Err(crate::Error::Usage(format!(
                "--callback-path {path:?}: a path starting with / (no query, fragment, *, :, {{ or }})"
            )));
        }
        self.callback_path = path.to_owned();
        Ok(self)
    }

    /// No spinner and no notices; the authorization URL is printed only when no browser could
    /// be opened for it (mcp-remote's `--silent`).
    pub fn silent(mut self, silent: bool) -> Self {
        self.silent = silent;
        self
    }

    /// The redirect URI for a listener on `port`.
    pub(crate) fn redirect_uri(&self, port: u16) -> String {
        format!("http://{}:{port}{}", self.host.in_url(), self.callback_path)
    }

    /// How long the browser step may take.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether to open the system browser (the URL is printed either way).
    pub fn open_browser(mut self, open: bool) -> Self {
        self.open_browser = open;
        self
    }
}

/// The hook of `login`: prints the URL to stderr, opens the browser, starts the spinner, and
/// waits for the callback.
#[derive(Debug)]
pub(crate) struct BrowserHook {
    options: LoginOptions,
    prompted: AtomicBool,
    stop: CancellationToken,
    /// The clock the spinner's frames wait on.
    clock: SharedClock,
}

impl BrowserHook {
    pub(crate) fn new(options: LoginOptions, clock: SharedClock) -> Self {
        BrowserHook {
            options,
            prompted: AtomicBool::new(false),
            stop: CancellationToken::new(),
            clock,
        }
    }

    /// Whether the user was sent to the browser.
    pub(crate) fn prompted(&self) -> bool {
        self.prompted.load(Ordering::SeqCst)
    }

    /// Stop the spinner (if any) and clear its line.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }
}

#[async_trait::async_trait]
impl AuthorizationHook for BrowserHook {
    async fn authorization_required(&self, request: AuthorizationRequest) -> HookDecision {
        self.prompted.store(true, Ordering::SeqCst);
        let url = request.authorization_url;
        let print_url = || {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "To authorize mcp-connect, open this URL in a browser:");
            let _ = writeln!(err, "{AUTHORIZATION_URL_PREFIX}{url}");
            let _ = err.flush();
        };
        if self.options.silent {
            // Only what the user cannot do without: the URL, when no browser shows it.
            if !(self.options.open_browser && open_browser(&url)) {
                print_url();
            }
            return HookDecision::Wait;
        }
        print_url();
        if self.options.open_browser && !open_browser(&url) {
            eprintln!("(no browser could be opened: open the URL above yourself)");
        }
        if std::io::stderr().is_terminal() {
            tokio::spawn(spin(self.clock.clone(), self.stop.clone(), self.options.timeout));
        }
        HookDecision::Wait
    }
}

/// Open `url` with the system's opener; whether one was started.
fn open_browser(url: &str) -> bool {
    let command: Option<(&str, Vec<&str>)> = if cfg!(target_os = "macos") {
        Some(("open", vec![url]))
    } else if cfg!(windows) {
        Some(("cmd", vec!["/C", "start", "", url]))
    } else if std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some()
    {
        Some(("xdg-open", vec![url]))
    } else {
        None
    };
    let Some((program, args)) = command else { return false };
    std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .is_ok()
}

/// The spinner: one frame every 100 ms with the time left, until `stop`.
async fn spin(clock: SharedClock, stop: CancellationToken, timeout: Duration) {
    const FRAMES: [char; 4] = ['|', '/', '-', '\\'];
    const STEP: Duration = Duration::from_millis(100);
    let mut left = timeout;
    let mut frame = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = clock.sleep(STEP) => {}
        }
        frame = (frame + 1) % FRAMES.len();
        left = left.saturating_sub(STEP);
        let secs = left.as_secs();
        eprint!(
            "\r{} waiting for the browser step ({}:{:02} left) ",
            FRAMES[frame],
            secs / 60,
            secs % 60
        );
    }
    eprint!("\r\x1b[2K");
}
