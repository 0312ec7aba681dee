//! `mcp-connect`: see the crate docs and `mcp-connect --help`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use mcp_connect::{Client, ClientOptions, EXIT_CODES, Error, LoginOptions, ServerStatus};

/// A command-line MCP client with OAuth: log in once, then list and call tools, or bridge a
/// desktop host's stdio to a remote server with `proxy`. Tokens are kept encrypted in the store
/// directory and refreshed silently; several processes share them safely.
#[derive(Debug, Parser)]
#[command(name = "mcp-connect", version, after_help = EXIT_CODES)]
struct Cli {
    /// The tenant the tokens belong to.
    #[arg(long, global = true, default_value = "default")]
    tenant: String,
    /// The user the tokens belong to (default: $USER).
    #[arg(long, global = true)]
    user: Option<String>,
    /// The store directory (default: $MCP_CONNECT_STORE, else $XDG_DATA_HOME/mcp-connect,
    /// else ~/.local/share/mcp-connect).
    #[arg(long, global = true)]
    store: Option<PathBuf>,
    /// Print results as JSON on stdout (errors too; with `proxy`, errors go to stderr, since
    /// stdout carries only JSON-RPC).
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for a store lock held by another process before giving up (exit 8).
    #[arg(long, global = true, default_value_t = 10)]
    lock_timeout: u64,
    /// Log to stderr (-v: info, -vv: debug). Secrets are never logged.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// No notices on stderr: only errors, and the authorization URL when no browser could be
    /// opened (mcp-remote's `--silent`; overrides -v).
    #[arg(long, global = true)]
    silent: bool,
    /// Write debug logs to `debug.log` in the store directory (mode 0600; secrets are never
    /// logged), as mcp-remote's `--debug` does.
    #[arg(long, global = true)]
    debug: bool,
    /// Seconds the MCP server may take to answer the handshake or a request before the command
    /// fails (exit 14).
    #[arg(long, global = true, default_value_t = 30)]
    request_timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct BrowserArgs {
    /// The loopback port of the OAuth callback (0: any free port; a client registered for one
    /// port is registered again for another). Default: the stored client's port, else one
    /// derived from the server URL (33418-35417), else the next free ones.
    #[arg(long)]
    port: Option<u16>,
    /// Seconds the browser step may take (mcp-remote's `--auth-timeout` is an alias).
    #[arg(long, visible_alias = "auth-timeout", default_value_t = 120)]
    timeout: u64,
    /// Do not open a browser; only print the URL (also: MCP_CONNECT_NO_BROWSER=1).
    #[arg(long)]
    no_browser: bool,
    /// The host of the redirect URI: 127.0.0.1, localhost or ::1 (the callback listens on
    /// loopback only).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The path of the redirect URI (mcp-remote's default is /oauth/callback).
    #[arg(long, default_value = "/callback")]
    callback_path: String,
}

impl BrowserArgs {
    fn options(&self) -> Result<LoginOptions, Error> {
        let mut options = LoginOptions::default()
            .timeout(Duration::from_secs(self.timeout.max(1)))
            .host(&self.host)?
            .callback_path(&self.callback_path)?;
        if let Some(port) = self.port {
            options = options.port(port);
        }
        Ok(if self.no_browser { options.open_browser(false) } else { options })
    }
}

/// mcp-remote's flags for the connection to one server.
#[derive(Debug, Args, Default)]
struct ServerArgs {
    /// A header sent with every request to the MCP server, 'Name: value' (repeatable);
    /// `${VAR}` in the value is taken from the environment. Never printed or logged.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// A file of headers, one 'Name: value' per line (`#` comments; `${VAR}` as in --header),
    /// which keeps them out of the command line.
    #[arg(long, value_name = "FILE")]
    header_file: Option<PathBuf>,
    /// A parameter added to the authorization URL, name=value (repeatable; e.g.
    /// prompt=consent). The protocol's own parameters cannot be replaced.
    #[arg(long = "authorize-param", value_name = "NAME=VALUE")]
    authorize_params: Vec<String>,
    /// Allow plain http to authorization servers that are not on loopback (tokens and secrets
    /// then cross the network in the clear).
    #[arg(long)]
    allow_http: bool,
    /// Allow private, CGNAT (100.64/10, Tailscale) and link-local addresses in discovery and
    /// the OAuth requests (refused by default).
    #[arg(long)]
    allow_private_network: bool,
    /// Use the proxy named by HTTPS_PROXY / HTTP_PROXY / ALL_PROXY (minus NO_PROXY) for the
    /// OAuth requests.
    #[arg(long)]
    enable_proxy: bool,
    /// mcp-remote's transport strategy. mcp-connect speaks streamable HTTP: `http-first`,
    /// `http-only` and `sse-first` all use it (a server that speaks only the legacy HTTP+SSE
    /// transport is named as such, exit 4); `sse-only` is refused.
    #[arg(long, value_enum, default_value_t = Transport::HttpFirst)]
    transport: Transport,
    /// Hide the tools matching PATTERN (`*` wildcards, any case; repeatable): not listed,
    /// and refused if called.
    #[arg(long = "ignore-tool", value_name = "PATTERN")]
    ignore_tools: Vec<String>,
    /// A client registered out of band, used instead of dynamic registration: JSON with
    /// `client_id` and an optional `client_secret`, or `@file` holding it. Give it to every
    /// command for the server (the tokens are kept apart from other clients').
    #[arg(long, value_name = "JSON|@FILE")]
    static_oauth_client_info: Option<String>,
    /// RFC 7591 client metadata sent with dynamic registration (JSON or `@file`): e.g.
    /// `{"client_name": "My Desktop"}`. The protocol's own fields are not replaced.
    #[arg(long, value_name = "JSON|@FILE")]
    static_oauth_client_metadata: Option<String>,
    /// The URL of this client's metadata document (a client ID metadata document), used as the
    /// client id where the authorization server supports them.
    #[arg(long, value_name = "URL")]
    client_metadata_url: Option<String>,
    /// Workload identity (SEP-1933): tokens from the jwt-bearer grant with the assertion in
    /// FILE (a Kubernetes or cloud workload token; read again when it changes), no browser.
    #[arg(long, value_name = "FILE", conflicts_with = "workload_identity_env")]
    workload_identity_file: Option<std::path::PathBuf>,
    /// Workload identity with the assertion in the environment variable VAR.
    #[arg(long, value_name = "VAR")]
    workload_identity_env: Option<String>,
    /// The scopes to ask for (space separated). Give it to every command for the server.
    #[arg(long)]
    scope: Option<String>,
    /// The RFC 8707 `resource` to send in authorization and token requests instead of the
    /// one the server's metadata names.
    #[arg(long, value_name = "URL")]
    resource: Option<String>,
    /// Send no `resource` parameter (Microsoft Entra rejects it).
    #[arg(long, conflicts_with = "resource")]
    disable_resource_parameter: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Discover, register and authorize in the browser (the URL is always printed on stderr).
    Login {
        /// The MCP server URL.
        url: String,
        #[command(flatten)]
        browser: BrowserArgs,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List the server's tools.
    Tools {
        /// The MCP server URL.
        url: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Call a tool.
    Call {
        /// The MCP server URL.
        url: String,
        /// The tool name.
        tool: String,
        /// The arguments, a JSON object.
        arguments: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show what is stored per server: expiry, refresh token held, issuer, client id, and the
    /// last thing that happened to its credentials.
    Status,
    /// What happened to this server's credentials, newest first: logins, registrations, every
    /// refresh request with its outcome and the process that sent it, why a new login was
    /// needed, logouts. Never a secret.
    Why {
        /// The MCP server URL.
        url: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Revoke the tokens at the authorization server (RFC 7009) and delete them.
    Logout {
        /// The MCP server URL.
        url: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Bridge stdio (for a desktop MCP host) to the server's streamable HTTP endpoint.
    Proxy {
        /// The MCP server URL.
        url: String,
        #[command(flatten)]
        browser: BrowserArgs,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Take over another client's stored login for a server (today: mcp-remote's `~/.mcp-auth`).
    /// Stop that client for the server first.
    Import {
        /// Where from.
        #[arg(value_enum)]
        source: ImportSource,
        /// The MCP server URL, as given to mcp-remote.
        url: String,
        /// mcp-remote's directory (default: $MCP_REMOTE_CONFIG_DIR, else ~/.mcp-auth).
        #[arg(long, value_name = "DIR")]
        from: Option<PathBuf>,
        /// Replace usable tokens already stored for the server.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Client mode for the official MCP conformance suite (server URL last).
    #[command(hide = true)]
    Conformance {
        /// The MCP server URL (the suite appends it).
        url: String,
    },
}

/// mcp-remote's `--transport` values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
enum Transport {
    /// Streamable HTTP (the legacy HTTP+SSE transport is not spoken).
    #[default]
    HttpFirst,
    /// Streamable HTTP.
    HttpOnly,
    /// Streamable HTTP (the legacy HTTP+SSE transport is not spoken).
    SseFirst,
    /// Refused: the legacy HTTP+SSE transport is not spoken.
    SseOnly,
}

/// Another client whose stored logins `import` reads.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ImportSource {
    /// mcp-remote (`npx mcp-remote`): `~/.mcp-auth/mcp-remote-*/`.
    McpRemote,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.debug {
        match debug_log(&cli) {
            Ok(file) => tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_writer(std::sync::Mutex::new(file))
                .with_ansi(false)
                .init(),
            Err(e) => {
                eprintln!("mcp-connect: error: {e}");
                std::process::exit(i32::from(e.exit_code()));
            }
        }
    } else if cli.verbose > 0 && !cli.silent {
        let level = if cli.verbose > 1 { tracing::Level::DEBUG } else { tracing::Level::INFO };
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
    }
    if let Command::Conformance { url } = &cli.command {
        return mcp_connect::run_conformance(url).await;
    }
    let json = cli.json;
    // A proxy's stdout is the host's JSON-RPC stream: nothing else may go there.
    let proxy = matches!(cli.command, Command::Proxy { .. });
    let code = match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mcp-connect: error: {e}");
            if json {
                let body = serde_json::json!({
                    "error": { "message": e.to_string(), "exit_code": e.exit_code() }
                });
                if proxy {
                    eprintln!("{body}");
                } else {
                    println!("{body}");
                }
            }
            e.exit_code()
        }
    };
    // Exit here rather than by returning: the runtime's shutdown would wait for its blocking
    // stdin reader (the proxy's), which a host that stopped the proxy with a signal may never
    // close. Refreshes have been settled by now (see `run`).
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::process::exit(i32::from(code))
}

fn print_json(value: &impl serde::Serialize) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Mcp(format!("cannot encode the output: {e}")))?;
    println!("{text}");
    Ok(())
}

fn expiry(status: &ServerStatus) -> String {
    match status.expires_in {
        None => "no expiry".into(),
        Some(s) if s >= 0 => format!("expires in {}", human(s.unsigned_abs())),
        Some(s) => format!("expired {} ago", human(s.unsigned_abs())),
    }
}

fn human(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

fn print_status(status: &ServerStatus) {
    println!("{}", status.server);
    println!("  issuer:        {}", status.issuer.as_deref().unwrap_or("-"));
    println!("  client id:     {}", status.client_id.as_deref().unwrap_or("-"));
    println!("  access token:  {}", expiry(status));
    println!("  refresh token: {}", if status.has_refresh_token { "held" } else { "none" });
    if let Some(why) = &status.needs_login {
        println!("  needs login:   {why}");
    }
    if let Some(event) = &status.last_event {
        println!("  last event:    {}", event_line(event));
    }
}

fn event_line(event: &mcp_connect::Event) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_secs(event.at);
    format!(
        "{}  pid {:<7} {:<13} {}",
        httpdate::fmt_http_date(at),
        event.pid,
        event.kind,
        event.detail
    )
}

/// The store directory: `--store`, else `$MCP_CONNECT_STORE`, else the default.
fn store_dir(cli: &Cli) -> PathBuf {
    cli.store
        .clone()
        .or_else(|| {
            std::env::var_os("MCP_CONNECT_STORE").filter(|s| !s.is_empty()).map(PathBuf::from)
        })
        .unwrap_or_else(mcp_connect::default_store_dir)
}

/// `--debug`: debug logs appended to `debug.log` in the store directory, mode 0600.
fn debug_log(cli: &Cli) -> Result<std::fs::File, Error> {
    let dir = store_dir(cli);
    let path = dir.join("debug.log");
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    builder
        .create(&dir)
        .and_then(|()| options.open(&path))
        .map_err(|e| Error::Store(format!("cannot open the debug log {}: {e}", path.display())))
}

async fn run(cli: Cli) -> Result<u8, Error> {
    let store = store_dir(&cli);
    let mut options = ClientOptions::new(store)
        .tenant(cli.tenant)
        .lock_wait(Duration::from_secs(cli.lock_timeout))
        .request_timeout(Duration::from_secs(cli.request_timeout.max(1)));
    if cli.silent {
        options = options.silent();
    }
    if let Some(user) = cli.user {
        options = options.user(user);
    }
    let server = match &cli.command {
        Command::Login { server, .. }
        | Command::Tools { server, .. }
        | Command::Call { server, .. }
        | Command::Proxy { server, .. }
        | Command::Logout { server, .. }
        | Command::Why { server, .. }
        | Command::Import { server, .. } => Some(server),
        _ => None,
    };
    if let Some(server) = server {
        if let Some(path) = &server.header_file {
            for (name, value) in mcp_connect::parse_header_file(path)? {
                options = options.header(name, value);
            }
        }
        for spec in &server.headers {
            let (name, value) = mcp_connect::parse_header(spec)?;
            options = options.header(name, value);
        }
        for spec in &server.authorize_params {
            let (name, value) = mcp_connect::parse_authorize_param(spec)?;
            options = options.authorize_param(name, value)?;
        }
        if server.transport == Transport::SseOnly {
            return Err(Error::Usage(
                "--transport sse-only: mcp-connect speaks streamable HTTP only; the legacy HTTP+SSE transport (MCP 2024-11-05) is not supported".into(),
            ));
        }
        if server.allow_http {
            options = options.allow_http();
        }
        if server.allow_private_network {
            options = options.allow_private_network();
        }
        if server.enable_proxy {
            options = options.enable_proxy();
        }
        for pattern in &server.ignore_tools {
            options = options.ignore_tool(pattern.clone());
        }
        if let Some(info) = &server.static_oauth_client_info {
            options = options.static_client(mcp_connect::StaticClient::parse(info)?);
        }
        if let Some(metadata) = &server.static_oauth_client_metadata {
            options = options.client_metadata(mcp_connect::parse_client_metadata(metadata)?);
        }
        if let Some(url) = &server.client_metadata_url {
            options = options.client_metadata_url(url)?;
        }
        if let Some(path) = &server.workload_identity_file {
            options = options.workload_identity_file(path.clone());
        }
        if let Some(name) = &server.workload_identity_env {
            options = options.workload_identity_env(name.clone());
        }
        if let Some(scope) = &server.scope {
            options = options.scope(scope.clone());
        }
        if let Some(resource) = &server.resource {
            options = options.resource(resource.clone());
        }
        if server.disable_resource_parameter {
            options = options.disable_resource_parameter();
        }
    }
    let json = cli.json;
    let silent = cli.silent;
    // Only these commands can start a refresh; the others (status, why, logout, import) must
    // not wait at the exit for refreshes of peers.
    let refreshes = matches!(
        cli.command,
        Command::Login { .. }
            | Command::Tools { .. }
            | Command::Call { .. }
            | Command::Proxy { .. }
    );
    let client = Client::open(options).await?;
    let outcome = command(&client, cli.command, json, silent).await;
    // Refreshes started in the background must store their result before the process ends.
    let _settled = if refreshes { Some(client.settle().await) } else { None };
    outcome
}

async fn command(client: &Client, command: Command, json: bool, silent: bool) -> Result<u8, Error> {
    match command {
        Command::Login { url, browser, .. } => {
            let report = client.login(&url, &browser.options()?.silent(silent)).await?;
            if json {
                print_json(&report)?;
            } else if report.prompted {
                println!("Logged in to {}.", report.server);
                print_status(&report.status);
            } else {
                println!("Already authorized for {}.", report.server);
                print_status(&report.status);
            }
        }
        Command::Tools { url, .. } => {
            let tools = client.tools(&url).await?;
            if json {
                print_json(&tools)?;
            } else {
                for tool in tools {
                    match &tool.description {
                        Some(d) => println!("{}\t{}", tool.name, d),
                        None => println!("{}", tool.name),
                    }
                }
            }
        }
        Command::Call { url, tool, arguments, .. } => {
            let arguments = match arguments {
                None => None,
                Some(text) => match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(serde_json::Value::Object(map)) => Some(map),
                    Ok(_) => {
                        return Err(Error::Usage("the arguments must be a JSON object".into()));
                    }
                    Err(e) => {
                        return Err(Error::Usage(format!("the arguments are not JSON: {e}")));
                    }
                },
            };
            let result = client.call(&url, &tool, arguments).await?;
            if json {
                print_json(&result)?;
            } else {
                for content in &result.content {
                    match content.as_text() {
                        Some(text) => println!("{}", text.text),
                        None => print_json(content)?,
                    }
                }
            }
            if result.is_error == Some(true) {
                eprintln!("mcp-connect: error: {}", Error::ToolError);
                return Ok(Error::ToolError.exit_code());
            }
        }
        Command::Status => {
            let servers = client.status().await?;
            if json {
                print_json(&serde_json::json!({ "servers": servers }))?;
            } else if servers.is_empty() {
                println!("No servers stored.");
            } else {
                servers.iter().for_each(print_status);
            }
        }
        Command::Logout { url, .. } => {
            let report = client.logout(&url).await?;
            if json {
                print_json(&report)?;
            } else if report.deleted {
                println!("Logged out of {} (revocation: {}).", report.server, report.revocation);
            } else {
                println!("Nothing stored for {}.", report.server);
            }
        }
        Command::Import { source: ImportSource::McpRemote, url, from, force, .. } => {
            let report = client.import_mcp_remote(&url, from.as_deref(), force).await?;
            if json {
                print_json(&report)?;
            } else {
                println!(
                    "Imported mcp-remote's login for {} from {} (client id {}, issuer {}, {}).",
                    report.server,
                    report.from.display(),
                    report.client_id,
                    report.issuer,
                    if report.has_refresh_token {
                        "with a refresh token"
                    } else {
                        "no refresh token"
                    }
                );
            }
        }
        Command::Why { url, .. } => {
            let events = client.why(&url)?;
            if json {
                print_json(&serde_json::json!({ "server": url, "events": events }))?;
            } else if events.is_empty() {
                println!("Nothing recorded for {url}.");
            } else {
                println!("{url} (newest first)");
                for event in &events {
                    println!("  {}", event_line(event));
                }
            }
        }
        Command::Proxy { url, browser, .. } => {
            client.proxy(&url, &browser.options()?.silent(silent)).await?
        }
        Command::Conformance { .. } => unreachable!("handled before the store is opened"),
    }
    Ok(0)
}
