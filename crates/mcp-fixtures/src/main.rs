//! `mcp-fixtures`: start the fixture authorization server and MCP resource server on loopback,
//! with the knobs as flags, print their URLs, and serve until Ctrl-C.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use mcp_fixtures::{
    Approval, AuthServer, ClientAuth, ClientSpec, Fixtures, InjectedFailure, KnobSettings,
    ResourceServer,
};

/// Fixture OAuth authorization server and MCP resource server, on 127.0.0.1.
#[derive(Debug, Parser)]
#[command(name = "mcp-fixtures", version, about)]
struct Args {
    /// Port of the authorization server (0: any free port).
    #[arg(long, default_value_t = 0)]
    auth_port: u16,
    /// Port of the resource server (0: any free port).
    #[arg(long, default_value_t = 0)]
    resource_port: u16,
    /// Issuer path, such as /tenant1.
    #[arg(long)]
    issuer_path: Option<String>,
    /// Access-token lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    access_token_lifetime: u64,
    /// Refresh-token lifetime in seconds (default: for ever).
    #[arg(long)]
    refresh_token_lifetime: Option<u64>,
    /// Do not rotate refresh tokens.
    #[arg(long)]
    no_rotation: bool,
    /// Strict reuse detection: a rotated refresh token redeemed again revokes its family.
    #[arg(long)]
    reuse_detection: bool,
    /// Grace window in milliseconds in which a rotated refresh token still works.
    #[arg(long)]
    reuse_grace_ms: Option<u64>,
    /// Leave expires_in out of token responses.
    #[arg(long)]
    omit_expires_in: bool,
    /// Send expires_in as a JSON string.
    #[arg(long)]
    expires_in_as_string: bool,
    /// Send token_type "bearer" in lower case.
    #[arg(long)]
    lowercase_token_type: bool,
    /// Leave the refresh token out of refresh responses.
    #[arg(long)]
    omit_refresh_on_refresh: bool,
    /// Refuse refreshes without a scope parameter (Entra-style).
    #[arg(long)]
    require_scope_on_refresh: bool,
    /// Issue refresh tokens only when offline_access was granted.
    #[arg(long)]
    refresh_requires_offline_access: bool,
    /// Status for an expired access token at the resource server (e.g. 400).
    #[arg(long, default_value_t = 401)]
    expired_token_status: u16,
    /// Answer 401s without a WWW-Authenticate header.
    #[arg(long)]
    omit_challenge: bool,
    /// Delay every token response by this many milliseconds.
    #[arg(long, default_value_t = 0)]
    token_delay_ms: u64,
    /// Never answer the token endpoint.
    #[arg(long)]
    token_hang: bool,
    /// Answer the Nth token request with --fail-status.
    #[arg(long)]
    fail_nth: Option<u64>,
    /// The status for --fail-nth (503 by default; 429 for rate limiting).
    #[arg(long, default_value_t = 503)]
    fail_status: u16,
    /// Retry-After seconds for --fail-nth and --resource-fail-nth.
    #[arg(long)]
    retry_after: Option<u64>,
    /// Answer the Nth MCP request at the resource server with --resource-fail-status.
    #[arg(long)]
    resource_fail_nth: Option<u64>,
    /// The status for --resource-fail-nth (503; Retry-After from --retry-after).
    #[arg(long, default_value_t = 503)]
    resource_fail_status: u16,
    /// Let initialize through without a token (the first 401 comes later).
    #[arg(long)]
    anonymous_initialize: bool,
    /// The resource server checks tokens by RFC 7662 introspection over HTTP.
    #[arg(long)]
    introspection: bool,
    /// Server clock offset in milliseconds (positive: ahead).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    clock_offset_ms: i64,
    /// Deny every authorization instead of approving it.
    #[arg(long)]
    deny: bool,
    /// Require DPoP (with nonces) at the token endpoint and the resource server.
    #[arg(long)]
    dpop: bool,
    /// Do not serve dynamic client registration.
    #[arg(long)]
    no_registration: bool,
    /// Register a confidential client (client_secret_basic) with this id:secret.
    #[arg(long, value_name = "ID:SECRET")]
    pre_registered: Option<String>,
    /// Redirect URI for --pre-registered.
    #[arg(long, default_value = "http://127.0.0.1:3118/callback")]
    redirect_uri: String,
}

fn knobs(args: &Args) -> KnobSettings {
    let mut k = KnobSettings::default();
    k.access_token_lifetime = Duration::from_secs(args.access_token_lifetime);
    k.refresh_token_lifetime = args.refresh_token_lifetime.map(Duration::from_secs);
    k.refresh_rotation = !args.no_rotation;
    k.reuse_detection = args.reuse_detection;
    k.reuse_grace = args.reuse_grace_ms.map(Duration::from_millis);
    k.omit_expires_in = args.omit_expires_in;
    k.omit_refresh_on_refresh = args.omit_refresh_on_refresh;
    k.expires_in_as_string = args.expires_in_as_string;
    k.lowercase_token_type = args.lowercase_token_type;
    k.require_scope_on_refresh = args.require_scope_on_refresh;
    k.refresh_requires_offline_access = args.refresh_requires_offline_access;
    k.expired_token_status = args.expired_token_status;
    k.omit_challenge = args.omit_challenge;
    k.token_delay = Duration::from_millis(args.token_delay_ms);
    k.token_hang = args.token_hang;
    k.clock_offset_millis = args.clock_offset_ms;
    k.approval = if args.deny { Approval::Deny } else { Approval::Auto };
    k.dpop = args.dpop;
    k
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut builder = AuthServer::builder()
        .port(args.auth_port)
        .knobs(knobs(&args))
        .dynamic_registration(!args.no_registration);
    if let Some(path) = &args.issuer_path {
        builder = builder.issuer_path(path.clone());
    }
    let auth = builder.spawn().await?;
    if let Some(nth) = args.fail_nth {
        let mut failure = InjectedFailure::server_error(nth).with_status(args.fail_status);
        if let Some(secs) = args.retry_after {
            failure = failure.with_retry_after(Duration::from_secs(secs));
        }
        auth.knobs().fail_token_requests(failure);
    }
    if let Some(nth) = args.resource_fail_nth {
        let mut failure = InjectedFailure::server_error(nth).with_status(args.resource_fail_status);
        if let Some(secs) = args.retry_after {
            failure = failure.with_retry_after(Duration::from_secs(secs));
        }
        auth.knobs().fail_resource_requests(failure);
    }
    if let Some(pair) = &args.pre_registered {
        let (id, secret) = pair.split_once(':').ok_or("--pre-registered wants ID:SECRET")?;
        auth.register_client(
            ClientSpec::new(ClientAuth::ClientSecretBasic)
                .client_id(id)
                .client_secret(secret)
                .redirect_uri(args.redirect_uri.clone()),
        )?;
    }
    let resource = ResourceServer::builder(&auth)
        .port(args.resource_port)
        .anonymous_initialize(args.anonymous_initialize)
        .introspection(args.introspection)
        .spawn()
        .await?;
    println!("issuer               {}", auth.issuer());
    println!("as-metadata          {}", auth.metadata_url());
    println!("mcp                  {}", resource.url());
    println!("resource-metadata    {}", resource.resource_metadata_url());
    let fixtures = Fixtures::from_parts(auth, resource);
    tokio::signal::ctrl_c().await?;
    let stats = fixtures.auth().stats();
    eprintln!(
        "token requests {} (code {}, refresh {}), most redemptions of one refresh token {}, reuse detections {}",
        stats.token_requests(),
        stats.authorization_code_requests,
        stats.refresh_token_requests,
        stats.max_refresh_redemptions(),
        stats.reuse_detections
    );
    fixtures.shutdown().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcp-fixtures: {e}");
            ExitCode::FAILURE
        }
    }
}
