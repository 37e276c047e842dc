//! Below the API: arbitrary bytes as the request message.

use super::*;

/// Sends and receives messages as raw bytes, to put anything on the wire.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Rpc {
    Register,
    KeepAlive,
    Drain,
    Deregister,
    Watch,
    Resolve,
}

impl Rpc {
    pub(super) fn path(self) -> PathAndQuery {
        PathAndQuery::from_static(match self {
            Rpc::Register => "/switchboard.registry.v1.Registry/Register",
            Rpc::KeepAlive => "/switchboard.registry.v1.Registry/KeepAlive",
            Rpc::Drain => "/switchboard.registry.v1.Registry/Drain",
            Rpc::Deregister => "/switchboard.registry.v1.Registry/Deregister",
            Rpc::Watch => "/switchboard.registry.v1.Registry/Watch",
            Rpc::Resolve => "/switchboard.registry.v1.Registry/Resolve",
        })
    }

    /// Whether `bytes` decode as this RPC's request message.
    pub(super) fn decodes(self, bytes: &[u8]) -> bool {
        match self {
            Rpc::Register => RegisterRequest::decode(bytes).is_ok(),
            Rpc::KeepAlive => KeepAliveRequest::decode(bytes).is_ok(),
            Rpc::Drain => DrainRequest::decode(bytes).is_ok(),
            Rpc::Deregister => DeregisterRequest::decode(bytes).is_ok(),
            Rpc::Watch => WatchRequest::decode(bytes).is_ok(),
            Rpc::Resolve => ResolveRequest::decode(bytes).is_ok(),
        }
    }
}

/// Request messages: random bytes, a string field that is not UTF-8, or a
/// valid request cut short or with bytes appended.
pub(super) fn wire_message() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        (1u8..=2, prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(field, mut text)| {
            text.push(0xff);
            let mut message = vec![(field << 3) | 2, text.len() as u8];
            message.extend(text);
            message
        }),
        (
            register_input(),
            any::<Index>(),
            prop::collection::vec(any::<u8>(), 0..8)
        )
            .prop_map(|(input, cut, extra)| {
                let mut message = RegisterRequest {
                    service: input.service.value,
                    address: input.address.value,
                    metadata: input.metadata.value,
                    ttl_ms: input.ttl_ms.value,
                }
                .encode_to_vec();
                message.truncate(cut.index(message.len() + 1));
                message.extend(extra);
                message
            }),
    ]
}

pub(super) fn rpc() -> impl Strategy<Value = Rpc> {
    select(vec![
        Rpc::Register,
        Rpc::KeepAlive,
        Rpc::Drain,
        Rpc::Deregister,
        Rpc::Watch,
        Rpc::Resolve,
    ])
}

/// Sends `message` as the request of `rpc`; the first answer.
pub(super) async fn send_raw(channel: &Channel, rpc: Rpc, message: Vec<u8>) -> Result<(), Status> {
    let mut grpc = Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    match rpc {
        Rpc::Register | Rpc::Drain | Rpc::Deregister | Rpc::Resolve => grpc
            .unary::<_, Vec<u8>, _>(tonic::Request::new(message), rpc.path(), Raw)
            .await
            .map(drop),
        Rpc::Watch => {
            let mut stream = grpc
                .server_streaming::<_, Vec<u8>, _>(tonic::Request::new(message), rpc.path(), Raw)
                .await?
                .into_inner();
            stream.message().await.map(drop)
        }
        Rpc::KeepAlive => {
            let requests = tokio_stream::iter([message]);
            let mut stream = grpc
                .streaming::<_, _, Vec<u8>, _>(tonic::Request::new(requests), rpc.path(), Raw)
                .await?
                .into_inner();
            stream.message().await.map(drop)
        }
    }
}

#[test]
pub(super) fn undecodable_messages_get_internal_and_the_registry_serves_on() {
    count_panics();
    let runtime = runtime();
    let (address, registry, channel) = runtime.block_on(async {
        let (address, registry) = serve(RegistryConfig {
            max_message_bytes: MAX_MESSAGE_BYTES,
            max_registrations_per_second: None,
            ..RegistryConfig::default()
        })
        .await;
        let channel = wait_for("the registry", STARTUP, || {
            let uri = format!("http://{address}");
            async move { Channel::from_shared(uri).ok()?.connect().await.ok() }
        })
        .await;
        (address, registry, channel)
    });
    let outcomes = RefCell::new(BTreeMap::<String, usize>::new());
    let mut runner = TestRunner::new(Config {
        cases: 200,
        failure_persistence: None,
        max_shrink_iters: 64,
        ..Config::default()
    });
    let result = runner.run(&(rpc(), wire_message()), |(rpc, message)| {
        let what = format!("{rpc:?} with a {}-byte message", message.len());
        let oversized = message.len() > MAX_MESSAGE_BYTES;
        let decodes = rpc.decodes(&message);
        let outcome = runtime.block_on(within(&what, send_raw(&channel, rpc, message)))?;
        let code = outcome.as_ref().err().map_or(Code::Ok, Status::code);
        *outcomes
            .borrow_mut()
            .entry(format!("{rpc:?} {code:?}"))
            .or_default() += 1;
        let message = outcome.as_ref().err().map_or("", Status::message);
        if oversized {
            prop_assert_eq!(code, Code::ResourceExhausted, "{}: {}", what, message);
        } else if !decodes {
            // gRPC's code for a request that does not parse.
            prop_assert_eq!(code, Code::Internal, "{}: {}", what, message);
            prop_assert!(
                message.starts_with("failed to decode Protobuf message"),
                "{}: {}",
                what,
                message
            );
        } else {
            prop_assert!(
                matches!(code, Code::Ok | Code::InvalidArgument | Code::NotFound),
                "{}: a request that decodes got {:?} {}",
                what,
                code,
                message
            );
        }
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    runtime.block_on(async {
        // The same connection and a new one still serve.
        for mut client in [
            RegistryClient::new(channel.clone()),
            registry_client(&address, STARTUP).await,
        ] {
            client
                .register(RegisterRequest {
                    service: "after.hardening.test".into(),
                    address: "192.0.2.9:80".into(),
                    ..RegisterRequest::default()
                })
                .await
                .expect("a normal Register after the garbage");
            assert_eq!(
                resolve(&mut client, "after.hardening.test").await,
                Some(vec!["192.0.2.9:80".to_owned()])
            );
        }
        assert!(!registry.is_finished(), "the registry stopped serving");
    });
    eprintln!("raw messages: outcomes {:?}", outcomes.borrow());
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
}

/// `watcher`, once its first message (the reset) has arrived.
pub(super) async fn first_message(mut watcher: Watcher) -> Watcher {
    watcher
        .wait_until("first message", STARTUP, |view| view.messages > 0)
        .await;
    watcher
}

/// The runtime one property test drives its registry and client on: proptest
/// cases are synchronous, so each case blocks on it.
pub(super) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}
