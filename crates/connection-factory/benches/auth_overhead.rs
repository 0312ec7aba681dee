//! The auth layer's cost per tool call, against a bare rmcp client on the same fixture server,
//! and the time from a mid-session 401 to the retried call's success. Results: BENCHMARKS.md.
//!
//! The per-call figures drive a `Connection` over `RefreshingProvider` (the provider with the
//! tokens in memory). The 50-401 side by side also drives the factory's own provider, the one
//! `ConnectionFactory::connect` builds over token storage and flow-state, and runs each client
//! [`SIDE_BY_SIDE_RUNS`] times, printing min and max and asserting one redemption per run for
//! ours.
//!
//! `cargo bench -p connection-factory --bench auth_overhead`. Under `cargo test --benches`
//! (`cargo xtask benches`, CI) every part runs once, small, without timing, and the asserted
//! counts fail the build when they break.

use std::sync::Arc;
use std::time::Duration;

use connection_factory::{
    AuthHttpClient, BoxFuture, ConnectOptions, Connection, Error, RefreshingProvider, Secret,
    Tokens,
};
use criterion::{Criterion, criterion_group};
use mcp_clock::{ManualClock, SharedClock, SystemClock, Timestamp};
use mcp_fixtures::{ClientAuth, ClientSpec, Fixtures, KnobSettings};
use rmcp::model::CallToolRequestParams;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{RoleClient, ServiceExt, service::RunningService};
use serde_json::{Value, json};

/// A minimal MCP server (one `echo` tool behind a bearer check) on a listener with
/// `TCP_NODELAY`, so that per-call time is not dominated by a Nagle / delayed-ACK stall.
mod nodelay {
    use std::sync::Arc;

    use axum::extract::Request;
    use axum::http::StatusCode;
    use axum::middleware::{self, Next};
    use axum::response::{IntoResponse, Response};
    use axum::serve::ListenerExt;
    use rmcp::handler::server::router::tool::ToolRouter;
    use rmcp::handler::server::wrapper::Parameters;
    use rmcp::model::{ServerCapabilities, ServerConfig};
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
    };
    use rmcp::{ServerHandler, schemars, tool, tool_handler, tool_router};

    #[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
    struct EchoArgs {
        /// The text to send back.
        text: String,
    }

    #[derive(Debug, Clone)]
    struct Echo {
        #[allow(dead_code)] // Read by the code that `tool_handler` generates.
        tool_router: ToolRouter<Self>,
    }

    #[tool_router]
    impl Echo {
        fn new() -> Self {
            Echo { tool_router: Self::tool_router() }
        }

        #[tool(description = "Send the text back.")]
        fn echo(&self, Parameters(EchoArgs { text }): Parameters<EchoArgs>) -> String {
            text
        }
    }

    #[tool_handler]
    impl ServerHandler for Echo {
        fn get_info(&self) -> ServerConfig {
            ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
        }
    }

    /// Serve on 127.0.0.1; returns the MCP URL. Requests need `Authorization: Bearer <token>`.
    pub(crate) async fn spawn(token: &str) -> String {
        let expected = Arc::new(format!("Bearer {token}"));
        let service: StreamableHttpService<Echo, LocalSessionManager> = StreamableHttpService::new(
            || Ok(Echo::new()),
            Arc::new(LocalSessionManager::default()),
            StreamableHttpServerConfig::default(),
        );
        let router = axum::Router::new().route_service("/mcp", service).layer(middleware::from_fn(
            move |req: Request, next: Next| {
                let expected = expected.clone();
                async move {
                    let ok = req
                        .headers()
                        .get("authorization")
                        .is_some_and(|v| v.as_bytes() == expected.as_bytes());
                    if ok {
                        next.run(req).await
                    } else {
                        let r: Response = StatusCode::UNAUTHORIZED.into_response();
                        r
                    }
                }
            },
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/mcp", listener.local_addr().unwrap());
        let listener = listener.tap_io(|s| {
            let _ = s.set_nodelay(true);
        });
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        url
    }
}

const LIFETIME: Duration = Duration::from_secs(60);
const PAIRED_ROUNDS: usize = 3_000;
/// How many times the side by side runs each client (once in test mode).
const SIDE_BY_SIDE_RUNS: usize = 5;

/// Criterion's rule: without `--bench` (as under `cargo test --benches`), or with `--test`, the
/// benches run once as tests. The parts outside criterion then use small sizes.
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test")
}

/// `full` when measuring, `quick` in test mode.
fn size(full: usize, quick: usize) -> usize {
    if test_mode() { quick } else { full }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn echo() -> CallToolRequestParams {
    CallToolRequestParams::new("echo")
        .with_arguments(json!({"text": "hi"}).as_object().unwrap().clone())
}

fn refresher(fx: &Fixtures, client_id: &str) -> connection_factory::RefreshFn {
    let (endpoint, client_id, http) = (fx.auth().token_endpoint(), client_id.to_owned(), http());
    let resource = fx.resource().url().to_owned();
    Arc::new(move |rt: Secret| -> BoxFuture<'static, Result<Tokens, Error>> {
        let (endpoint, client_id, http, resource) =
            (endpoint.clone(), client_id.clone(), http.clone(), resource.clone());
        Box::pin(async move {
            let form = [
                ("grant_type", "refresh_token"),
                ("refresh_token", rt.expose()),
                ("client_id", &client_id),
                ("resource", &resource),
            ];
            let resp = http
                .post(&endpoint)
                .form(&form)
                .send()
                .await
                .map_err(|e| Error::provider("token", e))?;
            let body: Value = resp.json().await.map_err(|e| Error::provider("token", e))?;
            let access = body["access_token"]
                .as_str()
                .ok_or_else(|| Error::provider_msg(body.to_string()))?;
            Ok(Tokens::new(access, body["refresh_token"].as_str().map(Secret::new)))
        })
    })
}

struct Setup {
    clock: ManualClock,
    fx: Fixtures,
    provider: Arc<RefreshingProvider>,
    access: String,
}

async fn setup() -> Setup {
    let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    let mut knobs = KnobSettings::default();
    knobs.access_token_lifetime = LIFETIME;
    let fx = Fixtures::start_with(clock.shared(), knobs).await.unwrap();
    let client = fx.auth().register_client(ClientSpec::new(ClientAuth::None)).unwrap();
    let issued = fx.auth().issue_tokens(client.client_id(), "mcp:tools", Some(fx.resource().url()));
    let provider = Arc::new(RefreshingProvider::new(
        "bench",
        Tokens::new(issued.access_token(), issued.refresh_token().map(Secret::new)),
        refresher(&fx, client.client_id()),
        SharedClock::system(),
    ));
    Setup { clock, fx, provider, access: issued.access_token().to_owned() }
}

async fn connect_bare(url: &str, token: &str) -> RunningService<RoleClient, ()> {
    let config =
        StreamableHttpClientTransportConfig::with_uri(url.to_owned()).auth_header(token.to_owned());
    ().serve(StreamableHttpClientTransport::with_client(http(), config)).await.unwrap()
}

async fn connect_layered(
    url: &str,
    provider: Arc<RefreshingProvider>,
) -> RunningService<RoleClient, ()> {
    let client = AuthHttpClient::new(provider).unwrap();
    let config = StreamableHttpClientTransportConfig::with_uri(url.to_owned());
    ().serve(StreamableHttpClientTransport::with_client(client, config)).await.unwrap()
}

fn per_call(c: &mut Criterion) {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let s = rt.block_on(setup());
    let url = s.fx.resource().url().to_owned();
    let bare = rt.block_on(connect_bare(&url, &s.access));
    let layered = rt.block_on(connect_layered(&url, s.provider.clone()));
    let conn = rt
        .block_on(Connection::connect(&url, s.provider.clone(), ConnectOptions::default()))
        .unwrap();

    // The same three clients against a server with TCP_NODELAY, with a token that never expires.
    let url_fast = rt.block_on(nodelay::spawn(&s.access));
    let fast_bare = rt.block_on(connect_bare(&url_fast, &s.access));
    let static_provider = Arc::new(RefreshingProvider::new(
        "bench-nodelay",
        Tokens::new(s.access.clone(), None),
        Arc::new(|_| -> BoxFuture<'static, Result<Tokens, Error>> {
            Box::pin(async { Err(Error::AuthorizationRequired { www_authenticate: None }) })
        }),
        SharedClock::system(),
    ));
    let fast_layered = rt.block_on(connect_layered(&url_fast, static_provider.clone()));
    let fast_conn = rt
        .block_on(Connection::connect(&url_fast, static_provider, ConnectOptions::default()))
        .unwrap();
    let mut group = c.benchmark_group("call_tool_echo_nodelay_server");
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("bare_rmcp_reqwest", |b| {
        b.to_async(&rt).iter(|| async { fast_bare.call_tool(echo()).await.unwrap() })
    });
    group.bench_function("rmcp_over_auth_http_client", |b| {
        b.to_async(&rt).iter(|| async { fast_layered.call_tool(echo()).await.unwrap() })
    });
    group.bench_function("connection", |b| {
        let args = json!({"text": "hi"}).as_object().cloned();
        b.to_async(&rt).iter(|| async { fast_conn.call_tool("echo", args.clone()).await.unwrap() })
    });
    group.finish();

    // Paired run: the three clients take turns call by call, so machine load (other builds on
    // a 2-core box) hits all three alike. Prints the medians.
    {
        let args = json!({"text": "hi"}).as_object().cloned();
        let mut times: [Vec<Duration>; 3] = Default::default();
        let rounds = size(PAIRED_ROUNDS, 10);
        rt.block_on(async {
            for i in 0..rounds {
                for k in 0..3 {
                    let which = (i + k) % 3;
                    let start = SystemClock::instant();
                    match which {
                        0 => drop(fast_bare.call_tool(echo()).await.unwrap()),
                        1 => drop(fast_layered.call_tool(echo()).await.unwrap()),
                        _ => drop(fast_conn.call_tool("echo", args.clone()).await.unwrap()),
                    }
                    times[which].push(SystemClock::instant() - start);
                }
            }
        });
        let median = |v: &mut Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let [b, l, c] = times.each_mut().map(median);
        println!(
            "paired medians over {rounds} rounds: bare {b:?}, auth client {l:?} ({:+.1} us), connection {c:?} ({:+.1} us)",
            (l.as_secs_f64() - b.as_secs_f64()) * 1e6,
            (c.as_secs_f64() - b.as_secs_f64()) * 1e6,
        );
    }
    drop((fast_bare, fast_layered, fast_conn));

    let mut group = c.benchmark_group("call_tool_echo_fixture");
    group.sample_size(30).measurement_time(Duration::from_secs(5));
    group.bench_function("bare_rmcp_reqwest", |b| {
        b.to_async(&rt).iter(|| async { bare.call_tool(echo()).await.unwrap() })
    });
    group.bench_function("rmcp_over_auth_http_client", |b| {
        b.to_async(&rt).iter(|| async { layered.call_tool(echo()).await.unwrap() })
    });
    group.bench_function("connection", |b| {
        let args = json!({"text": "hi"}).as_object().cloned();
        b.to_async(&rt).iter(|| async { conn.call_tool("echo", args.clone()).await.unwrap() })
    });
    group.finish();

    // Each iteration: the token expires, the call gets a 401, one refresh, one retry.
    let mut group = c.benchmark_group("mid_session_401");
    group.sample_size(30).measurement_time(Duration::from_secs(8));
    group.bench_function("expire_refresh_retry", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                s.clock.advance(LIFETIME + Duration::from_secs(1));
                let start = SystemClock::instant();
                rt.block_on(conn.call_tool("echo", json!({"text": "x"}).as_object().cloned()))
                    .unwrap();
                total += SystemClock::instant() - start;
            }
            total
        })
    });
    group.finish();
    drop((bare, layered, conn));
}

/// One run of the 50-concurrent-401 scenario: what the authorization server saw, and how long
/// the burst took.
struct Burst {
    ok: usize,
    refused: u64,
    refresh_requests: u64,
    max_redemptions: u64,
    families_revoked: u64,
    wall: Duration,
}

/// The client a side-by-side run drives.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Via {
    /// rmcp's own `AuthClient` (feature `auth`, an `AuthorizationManager` over an in-memory
    /// credential store).
    RmcpAuthClient,
    /// `Connection` over `RefreshingProvider` (tokens in memory).
    RefreshingProvider,
    /// `ConnectionFactory::connect`: the factory's own provider over token storage and
    /// flow-state (memory stores).
    Factory,
}

/// Fixture with rotation and strict reuse detection; one session warmed up, then the access
/// token expires and 50 concurrent calls are made through `via`.
async fn fifty_401s(via: Via) -> Burst {
    use rmcp::transport::auth::{AuthClient, AuthorizationManager, InMemoryCredentialStore};
    use rmcp::transport::{CredentialStore, StoredCredentials};

    let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    let mut knobs = KnobSettings::default();
    knobs.access_token_lifetime = LIFETIME;
    knobs.refresh_rotation = true;
    knobs.reuse_detection = true;
    knobs.reuse_grace = None;
    let fx = Fixtures::start_with(clock.shared(), knobs).await.unwrap();
    let client = fx.auth().register_client(ClientSpec::new(ClientAuth::None)).unwrap();
    let issued = fx.auth().issue_tokens(client.client_id(), "mcp:tools", Some(fx.resource().url()));
    let url = fx.resource().url().to_owned();
    let calls: Vec<BoxFuture<'static, bool>>;
    let keep: Box<dyn std::any::Any>;
    if via == Via::RmcpAuthClient {
        let mut manager =
            AuthorizationManager::new_allowing_private_addresses(url.as_str()).await.unwrap();
        manager.set_metadata(
            serde_json::from_value(json!({
                "authorization_endpoint": fx.auth().authorization_endpoint(),
                "token_endpoint": fx.auth().token_endpoint(),
            }))
            .unwrap(),
        );
        manager.configure_client_id(client.client_id()).unwrap();
        let store = InMemoryCredentialStore::new();
        let creds: StoredCredentials = serde_json::from_value(json!({
            "client_id": client.client_id(),
            "token_response": {
                "access_token": issued.access_token(),
                "refresh_token": issued.refresh_token(),
                "token_type": "Bearer",
            },
            "granted_scopes": ["mcp:tools"],
        }))
        .unwrap();
        store.save(creds).await.unwrap();
        manager.set_credential_store(store);
        let config =
            StreamableHttpClientTransportConfig::with_uri(url.clone()).max_concurrent_requests(64);
        let service = Arc::new(
            ().serve(StreamableHttpClientTransport::with_client(
                AuthClient::new(http(), manager),
                config,
            ))
            .await
            .unwrap(),
        );
        service.call_tool(echo()).await.unwrap();
        calls = (0..50)
            .map(|_| {
                let service = service.clone();
                Box::pin(async move { service.call_tool(echo()).await.is_ok() })
                    as BoxFuture<'static, bool>
            })
            .collect();
        keep = Box::new(service);
    } else if via == Via::Factory {
        let conn = Arc::new(factory_connection(&fx, &clock, client.client_id(), &issued).await);
        conn.call_tool("echo", json!({"text": "hi"}).as_object().cloned()).await.unwrap();
        calls = (0..50)
            .map(|_| {
                let conn = conn.clone();
                Box::pin(async move {
                    conn.call_tool("echo", json!({"text": "hi"}).as_object().cloned()).await.is_ok()
                }) as BoxFuture<'static, bool>
            })
            .collect();
        keep = Box::new(conn);
    } else {
        let provider = Arc::new(RefreshingProvider::new(
            "side-by-side",
            Tokens::new(issued.access_token(), issued.refresh_token().map(Secret::new)),
            refresher(&fx, client.client_id()),
            SharedClock::system(),
        ));
        let options = ConnectOptions::default().max_concurrent_requests(64);
        let conn = Arc::new(Connection::connect(&url, provider, options).await.unwrap());
        conn.call_tool("echo", json!({"text": "hi"}).as_object().cloned()).await.unwrap();
        calls = (0..50)
            .map(|_| {
                let conn = conn.clone();
                Box::pin(async move {
                    conn.call_tool("echo", json!({"text": "hi"}).as_object().cloned()).await.is_ok()
                }) as BoxFuture<'static, bool>
            })
            .collect();
        keep = Box::new(conn);
    }
    // Let the background GET stream open before the tokens expire.
    while fx.resource().stats().requests < 4 {
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(5)).await;
    }
    clock.advance(LIFETIME + Duration::from_secs(1));
    let start = SystemClock::instant();
    let handles: Vec<_> = calls.into_iter().map(tokio::spawn).collect();
    let mut ok = 0;
    for h in handles {
        ok += usize::from(h.await.unwrap());
    }
    let wall = SystemClock::instant() - start;
    drop(keep);
    let stats = fx.auth().stats();
    Burst {
        ok,
        refused: fx.resource().stats().unauthorized,
        refresh_requests: stats.refresh_token_requests,
        max_redemptions: stats.max_refresh_redemptions(),
        families_revoked: stats.families_revoked,
        wall,
    }
}

/// A connection made by `ConnectionFactory::connect`, whose stored tokens (the fixture's
/// `issued`, which the client believes live an hour) and registration are in token storage.
async fn factory_connection(
    fx: &Fixtures,
    clock: &ManualClock,
    client_id: &str,
    issued: &mcp_fixtures::IssuedTokens,
) -> Connection {
    use connection_factory::{ConnectionFactory, FactoryConfig, OAuthRefresher, stored_client};
    use flow_state::{FlowManager, MemoryStore, SharedStore};
    use mcp_oauth::{HttpPolicy, OAuthClient, ReqwestHttpClient};
    use token_storage::{Keyring, MemoryTokenStore, TokenKey, TokenResponse, TokenStorage};

    let oauth =
        OAuthClient::new(ReqwestHttpClient::new(HttpPolicy::default()).unwrap(), clock.shared());
    let discovery = oauth.discover(&fx.resource().url().parse().unwrap(), None).await.unwrap();
    let registration = mcp_oauth::ClientRegistration {
        client_id: client_id.to_owned(),
        client_secret: None,
        client_key: None,
        auth_method: mcp_oauth::TokenEndpointAuthMethod::None,
        source: mcp_oauth::RegistrationSource::Dynamic,
        issuer: discovery.issuer().to_owned(),
        client_secret_expires_at: None,
    };
    let mut config = token_storage::TokenStorageConfig::default();
    config.max_date_correction = Duration::ZERO; // hyper's Date header is real time
    let storage = TokenStorage::builder(
        MemoryTokenStore::new().into(),
        Arc::new(Keyring::parse(&"42".repeat(32)).unwrap()),
        Arc::new(OAuthRefresher::new(oauth)),
    )
    .clock(clock.shared())
    .config(config)
    .build();
    let key = TokenKey::new("bench", "alice", "fixture");
    storage.store_client(&key, &stored_client(&discovery, &registration)).await.unwrap();
    let response = TokenResponse::bearer(issued.access_token())
        .expires_in(Duration::from_secs(3600))
        .refresh_token(issued.refresh_token().unwrap())
        .scope("mcp:tools");
    storage.store(&key, discovery.issuer(), response).await.unwrap();
    let flows = FlowManager::builder(SharedStore::new(MemoryStore::new()))
        .clock(clock.shared())
        .build()
        .unwrap();
    ConnectionFactory::new(flows, storage)
        .unwrap()
        .connect(
            FactoryConfig::new(fx.resource().url(), "bench", "alice", "fixture")
                .max_concurrent_requests(64),
        )
        .await
        .unwrap()
}

/// The 50-concurrent-401 scenario through rmcp's own auth client, this crate's
/// `RefreshingProvider` and the factory's provider, each [`SIDE_BY_SIDE_RUNS`] times in turn.
/// Prints one line per client with the min and max of each figure; asserts, every run, that our
/// two providers answered all 50 calls with one redemption and revoked nothing.
fn side_by_side() {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let runs = size(SIDE_BY_SIDE_RUNS, 1);
    let clients = [
        ("rmcp AuthClient", Via::RmcpAuthClient),
        ("connection-factory RefreshingProvider", Via::RefreshingProvider),
        ("connection-factory ConnectionFactory (token storage + flow-state)", Via::Factory),
    ];
    let mut bursts: Vec<Vec<Burst>> = clients.iter().map(|_| Vec::new()).collect();
    for _ in 0..runs {
        for (i, (name, via)) in clients.iter().enumerate() {
            let b = rt.block_on(fifty_401s(*via));
            if *via != Via::RmcpAuthClient {
                assert_eq!(b.ok, 50, "{name}: every call succeeded");
                assert_eq!(b.refresh_requests, 1, "{name}: one refresh request");
                assert_eq!(b.max_redemptions, 1, "{name}: one redemption of the refresh token");
                assert_eq!(b.families_revoked, 0, "{name}: nothing revoked");
            }
            bursts[i].push(b);
        }
    }
    for ((name, _), runs) in clients.iter().zip(&bursts) {
        let range = |f: &dyn Fn(&Burst) -> u64| {
            let (lo, hi) = (runs.iter().map(f).min().unwrap(), runs.iter().map(f).max().unwrap());
            if lo == hi { format!("{lo}") } else { format!("{lo}-{hi}") }
        };
        let walls: Vec<Duration> = runs.iter().map(|b| b.wall).collect();
        println!(
            "50 concurrent calls after expiry via {name}, {} runs (min-max): {}/50 ok, {} refused with 401, {} refresh requests, max redemptions of one refresh token {}, families revoked {}, wall {:?}-{:?}",
            runs.len(),
            range(&|b| b.ok as u64),
            range(&|b| b.refused),
            range(&|b| b.refresh_requests),
            range(&|b| b.max_redemptions),
            range(&|b| b.families_revoked),
            walls.iter().min().unwrap(),
            walls.iter().max().unwrap(),
        );
    }
}

criterion_group!(benches, per_call);

fn main() {
    side_by_side();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
