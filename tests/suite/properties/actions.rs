//! Running one action against the registry and judging the answer, and the property over whole sequences of them.

use super::*;

pub(super) struct Harness {
    pub(super) client: RegistryClient<Channel>,
    pub(super) epoch: u64,
    /// A lease granted by another registry instance.
    pub(super) foreign_lease: String,
    pub(super) model: RefCell<Model>,
}

/// A lease id to send, and what the registry must answer for it.
pub(super) struct LeaseCall {
    pub(super) id: String,
    /// Index into the model of the lease it names, if any.
    pub(super) lease: Option<usize>,
}

impl Harness {
    pub(super) fn resolve_lease(&self, input: &LeaseInput) -> LeaseCall {
        let model = self.model.borrow();
        let granted = |pick: &Index| (!model.leases.is_empty()).then(|| pick.get(&model.leases).id);
        let id = match input {
            LeaseInput::Granted { pick, upper } => match granted(pick) {
                Some(id) if *upper => format!("{id:032X}"),
                Some(id) => format!("{id:032x}"),
                None => format!("{:032x}", rand::random::<u128>()),
            },
            LeaseInput::Changed { pick, at, to } => {
                let id = granted(pick).unwrap_or_else(rand::random);
                let mut chars: Vec<char> = format!("{id:032x}").chars().collect();
                let i = at.index(chars.len());
                // Make sure the character really changes.
                chars[i] = if to.eq_ignore_ascii_case(&chars[i]) {
                    if chars[i] == '0' {
                        '1'
                    } else {
                        '0'
                    }
                } else {
                    *to
                };
                chars.into_iter().collect()
            }
            LeaseInput::Padded {
                pick,
                before,
                after,
            } => {
                let id = granted(pick).unwrap_or_else(rand::random);
                format!("{before}{id:032x}{after}")
            }
            LeaseInput::Foreign => self.foreign_lease.clone(),
            LeaseInput::Text(text) => text.clone(),
        };
        let lease = lease_rule(&id).and_then(|value| model.find(value));
        LeaseCall { id, lease }
    }

    /// What a call naming `call` must get, given the request's encoded size.
    pub(super) fn expect_for_lease(
        &self,
        call: &LeaseCall,
        encoded_len: usize,
        end: Instant,
    ) -> Expect {
        if encoded_len > MAX_MESSAGE_BYTES {
            return Expect::TooLarge;
        }
        let Some(value) = lease_rule(&call.id) else {
            return Expect::Invalid("lease_id");
        };
        let id = format!("{value:032x}");
        match call.lease.map(|i| self.model.borrow().leases[i].clone()) {
            None => Expect::NotFound(id),
            Some(lease) if lease.surely_live(end) => Expect::Ok,
            Some(lease) if matches!(lease.fate, Fate::Revoked | Fate::Gone) => Expect::NotFound(id),
            Some(_) => Expect::OkOrNotFound(id),
        }
    }

    /// Marks a lease the registry answered NOT_FOUND for.
    pub(super) fn gone(&self, lease: Option<usize>) {
        if let Some(i) = lease {
            let mut model = self.model.borrow_mut();
            let lease = &mut model.leases[i];
            if lease.fate != Fate::Revoked {
                lease.fate = Fate::Gone;
            }
        }
    }

    pub(super) async fn run(&self, action: Action) -> Result<(), TestCaseError> {
        match action {
            Action::Register(input) => self.register(input).await,
            Action::KeepAlive(inputs) => self.keep_alive(inputs).await,
            Action::Drain(input) => self.drain_or_deregister(input, false).await,
            Action::Deregister(input) => self.drain_or_deregister(input, true).await,
            Action::Watch(service) => self.watch(service).await,
            Action::Resolve(service) => self.resolve(service).await,
            Action::ListServices => self.list_services().await,
        }
    }

    pub(super) fn record(&self, rpc: &str, outcome: &Result<(), Status>) {
        let code = match outcome {
            Ok(()) => "OK".to_owned(),
            Err(status) => format!("{:?}", status.code()),
        };
        self.model.borrow_mut().count(format!("{rpc} {code}"));
    }

    pub(super) async fn register(&self, input: RegisterInput) -> Result<(), TestCaseError> {
        prop_assert_eq!(
            service_rule(&input.service.value),
            input.service.valid,
            "generator and rule disagree on {}",
            short(&input.service.value)
        );
        let request = RegisterRequest {
            service: input.service.value.clone(),
            address: input.address.value.clone(),
            metadata: input.metadata.value.clone(),
            ttl_ms: input.ttl_ms.value,
        };
        let expect = if request.encoded_len() > MAX_MESSAGE_BYTES {
            Expect::TooLarge
        } else if !input.service.valid {
            Expect::Invalid("service")
        } else if !input.address.valid {
            Expect::Invalid("address")
        } else if !input.metadata.valid {
            Expect::Invalid("metadata")
        } else if !input.ttl_ms.valid {
            Expect::Invalid("ttl_ms")
        } else {
            Expect::Ok
        };
        let what = format!(
            "Register service {} address {} metadata of {} entries ({} bytes) ttl_ms {}",
            short(&input.service.value),
            short(&input.address.value),
            request.metadata.len(),
            request
                .metadata
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>(),
            request.ttl_ms
        );
        let sent = Instant::now();
        let outcome = within(&what, self.client.clone().register(request)).await?;
        let answered = Instant::now();
        self.record(
            "Register",
            &outcome.as_ref().map(drop).map_err(Clone::clone),
        );
        let reply = match outcome {
            Err(status) => return check_refusal(&what, &status, &expect),
            Ok(reply) if expect == Expect::Ok => reply.into_inner(),
            Ok(reply) => {
                return Err(TestCaseError::fail(format!(
                    "{what}: expected {expect:?}, got OK {reply:?}"
                )))
            }
        };
        let granted = if input.ttl_ms.value == 0 {
            5000
        } else {
            input.ttl_ms.value
        };
        prop_assert_eq!(reply.ttl_ms, granted, "{}: granted TTL", what);
        prop_assert_eq!(reply.epoch, self.epoch, "{}: epoch", what);
        let id = lease_rule(&reply.lease_id)
            .filter(|_| reply.lease_id.bytes().all(|b| !b.is_ascii_uppercase()))
            .ok_or_else(|| TestCaseError::fail(format!("{what}: lease id {:?}", reply.lease_id)))?;
        let mut model = self.model.borrow_mut();
        prop_assert!(model.find(id).is_none(), "{}: lease id reused", what);
        let key = (input.service.value.clone(), input.address.value.clone());
        if let Some(previous) = model.holders.get(&key).copied() {
            // Taken over: the old lease is dead from now on.
            model.leases[previous].fate = Fate::Revoked;
        }
        model.leases.push(Lease {
            id,
            metadata: input.metadata.value,
            ttl: Duration::from_millis(granted),
            sent,
            answered,
            fate: Fate::Live,
            draining: false,
        });
        let index = model.leases.len() - 1;
        model.holders.insert(key, index);
        Ok(())
    }

    pub(super) async fn keep_alive(&self, inputs: Vec<LeaseInput>) -> Result<(), TestCaseError> {
        let calls: Vec<LeaseCall> = inputs.iter().map(|i| self.resolve_lease(i)).collect();
        let requests: Vec<KeepAliveRequest> = calls
            .iter()
            .map(|c| KeepAliveRequest {
                lease_id: c.id.clone(),
            })
            .collect();
        let what = format!(
            "KeepAlive of {:?}",
            calls.iter().map(|c| short(&c.id)).collect::<Vec<_>>()
        );
        // An oversized heartbeat ends the stream where it stands: every
        // heartbeat before it is answered, none after it.
        let first_oversized = requests
            .iter()
            .position(|r| r.encoded_len() > MAX_MESSAGE_BYTES);
        let refusal = |i: usize, status: &Status, expect: &Expect| {
            if first_oversized == Some(i) && check_refusal(&what, status, &Expect::TooLarge).is_ok()
            {
                return Ok(());
            }
            check_refusal(&what, status, expect)
        };
        let mut client = self.client.clone();
        let mut replies = match within(
            &what,
            client.keep_alive(tokio_stream::iter(requests.clone())),
        )
        .await?
        {
            Ok(replies) => Some(replies.into_inner()),
            Err(status) => {
                // Refused before any reply: only the first heartbeat's
                // refusal can explain that.
                let end = Instant::now();
                let expect = self.expect_for_lease(&calls[0], requests[0].encoded_len(), end);
                self.record("KeepAlive", &Err(status.clone()));
                refusal(0, &status, &expect)?;
                if status.code() == Code::NotFound {
                    self.gone(calls[0].lease);
                }
                None
            }
        };
        let mut refreshed = Vec::new();
        if let Some(stream) = replies.as_mut() {
            for (i, (call, request)) in calls.iter().zip(&requests).enumerate() {
                let next = within(&what, stream.message()).await?;
                let expect = self.expect_for_lease(call, request.encoded_len(), Instant::now());
                match next {
                    Ok(Some(reply)) => {
                        self.record("KeepAlive", &Ok(()));
                        prop_assert!(
                            expect.allows_ok(),
                            "{}: heartbeat {} answered OK, expected {:?}",
                            what,
                            short(&call.id),
                            expect
                        );
                        let lease = self.model.borrow().leases[call.lease.expect("known")].clone();
                        prop_assert_eq!(reply.lease_id, format!("{:032x}", lease.id));
                        prop_assert_eq!(reply.ttl_ms, lease.ttl.as_millis() as u64);
                        refreshed.push(call.lease.expect("known"));
                    }
                    Ok(None) => {
                        return Err(TestCaseError::fail(format!(
                            "{what}: stream ended before answering {}",
                            short(&call.id)
                        )))
                    }
                    Err(status) => {
                        self.record("KeepAlive", &Err(status.clone()));
                        refusal(i, &status, &expect)?;
                        if status.code() == Code::NotFound {
                            self.gone(call.lease);
                        }
                        break;
                    }
                }
            }
            // Every heartbeat answered or refused; then the stream ends.
            let end = within(&what, stream.message()).await?;
            prop_assert!(
                matches!(end, Ok(None)),
                "{}: after the last answer: {:?}",
                what,
                end
            );
        }
        // Their KeepAlive stream is gone, so are they.
        let mut model = self.model.borrow_mut();
        for i in refreshed {
            if model.leases[i].fate == Fate::Live {
                model.leases[i].fate = Fate::Doomed;
            }
        }
        Ok(())
    }

    pub(super) async fn drain_or_deregister(
        &self,
        input: LeaseInput,
        deregister: bool,
    ) -> Result<(), TestCaseError> {
        let call = self.resolve_lease(&input);
        let rpc = if deregister { "Deregister" } else { "Drain" };
        let what = format!("{rpc} {}", short(&call.id));
        let mut client = self.client.clone();
        let (outcome, encoded_len) = if deregister {
            let request = DeregisterRequest {
                lease_id: call.id.clone(),
            };
            let len = request.encoded_len();
            (
                within(&what, client.deregister(request)).await?.map(drop),
                len,
            )
        } else {
            let request = DrainRequest {
                lease_id: call.id.clone(),
            };
            let len = request.encoded_len();
            (within(&what, client.drain(request)).await?.map(drop), len)
        };
        let expect = self.expect_for_lease(&call, encoded_len, Instant::now());
        self.record(rpc, &outcome);
        match outcome {
            Ok(()) => {
                prop_assert!(expect.allows_ok(), "{}: OK, expected {:?}", what, expect);
                let mut model = self.model.borrow_mut();
                let lease = &mut model.leases[call.lease.expect("known")];
                if deregister {
                    lease.fate = Fate::Revoked;
                } else {
                    lease.draining = true;
                }
                Ok(())
            }
            Err(status) => {
                check_refusal(&what, &status, &expect)?;
                if matches!(expect, Expect::OkOrNotFound(_)) {
                    self.gone(call.lease);
                }
                Ok(())
            }
        }
    }

    pub(super) fn expect_for_service(&self, service: &Field<String>, encoded_len: usize) -> Expect {
        if encoded_len > MAX_MESSAGE_BYTES {
            Expect::TooLarge
        } else if service.valid {
            Expect::Ok
        } else {
            Expect::Invalid("service")
        }
    }

    pub(super) async fn watch(&self, service: Field<String>) -> Result<(), TestCaseError> {
        let request = WatchRequest {
            service: service.value.clone(),
            ..Default::default()
        };
        let expect = self.expect_for_service(&service, request.encoded_len());
        let what = format!("Watch {}", short(&service.value));
        let mut client = self.client.clone();
        let outcome = match within(&what, client.watch(request)).await? {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                within(&what, stream.message())
                    .await?
                    .map(|first| (first, stream))
            }
            Err(status) => Err(status),
        };
        self.record("Watch", &outcome.as_ref().map(drop).map_err(Clone::clone));
        match outcome {
            Ok((first, _stream)) => {
                prop_assert_eq!(&expect, &Expect::Ok, "{}: answered", what);
                let first = first.ok_or_else(|| {
                    TestCaseError::fail(format!("{what}: stream ended without a message"))
                })?;
                prop_assert_eq!(first.epoch, self.epoch, "{}: epoch", what);
                prop_assert!(
                    matches!(first.event, Some(Event::Reset(_))),
                    "{}: first message {:?}",
                    what,
                    first
                );
                Ok(())
            }
            Err(status) => check_refusal(&what, &status, &expect),
        }
    }

    pub(super) async fn resolve(&self, service: Field<String>) -> Result<(), TestCaseError> {
        let request = ResolveRequest {
            service: service.value.clone(),
        };
        let expect = self.expect_for_service(&service, request.encoded_len());
        let what = format!("Resolve {}", short(&service.value));
        let before = Instant::now();
        let outcome = within(&what, self.client.clone().resolve(request)).await?;
        let after = Instant::now();
        self.record("Resolve", &outcome.as_ref().map(drop).map_err(Clone::clone));
        match outcome {
            Ok(reply) => {
                prop_assert_eq!(&expect, &Expect::Ok, "{}: answered", what);
                let reply = reply.into_inner();
                prop_assert_eq!(reply.epoch, self.epoch, "{}: epoch", what);
                // Revoked leases are gone before their call answers.
                let problems = self.compare(&service.value, &reply, before, after, false);
                prop_assert!(problems.is_empty(), "{}: {:?}", what, problems);
                Ok(())
            }
            Err(status) => check_refusal(&what, &status, &expect),
        }
    }

    pub(super) async fn list_services(&self) -> Result<(), TestCaseError> {
        let outcome = within(
            "ListServices",
            self.client.clone().list_services(ListServicesRequest {}),
        )
        .await?;
        self.record(
            "ListServices",
            &outcome.as_ref().map(drop).map_err(Clone::clone),
        );
        let services = outcome
            .map_err(|s| TestCaseError::fail(format!("ListServices: {s:?}")))?
            .into_inner()
            .services;
        prop_assert!(
            services.windows(2).all(|w| w[0].service < w[1].service),
            "ListServices not sorted"
        );
        prop_assert!(
            services.iter().all(|s| s.endpoints > 0),
            "ListServices lists an empty service"
        );
        prop_assert!(
            services.iter().all(|s| service_rule(&s.service)),
            "ListServices lists an invalid name"
        );
        Ok(())
    }

    /// What is wrong with `reply` as the set of `service` some time between
    /// `before` and `after`. With `settled`, leases that have surely ended
    /// must be gone too (the caller polls, allowing for asynchronous removal);
    /// otherwise only revoked ones, which leave before their call answers.
    pub(super) fn compare(
        &self,
        service: &str,
        reply: &ResolveResponse,
        before: Instant,
        after: Instant,
        settled: bool,
    ) -> Vec<String> {
        let model = self.model.borrow();
        let mut problems = Vec::new();
        let listed: HashMap<&str, _> = reply
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e))
            .collect();
        for endpoint in &reply.endpoints {
            let key = (service.to_owned(), endpoint.address.clone());
            let Some(&holder) = model.holders.get(&key) else {
                problems.push(format!("{} listed but never registered", endpoint.address));
                continue;
            };
            let lease = &model.leases[holder];
            if lease.metadata != endpoint.metadata || lease.state() != endpoint.state {
                problems.push(format!(
                    "{} listed with metadata {:?} state {}, registered with {:?} state {}",
                    endpoint.address,
                    endpoint.metadata,
                    endpoint.state,
                    lease.metadata,
                    lease.state()
                ));
            }
        }
        for ((s, address), &holder) in &model.holders {
            if s != service {
                continue;
            }
            let lease = &model.leases[holder];
            let present = listed.contains_key(address.as_str());
            if lease.surely_live(after) && !present {
                problems.push(format!("{address} missing; its lease is live"));
            }
            let must_be_gone = if settled {
                lease.surely_ended(before)
            } else {
                lease.fate == Fate::Revoked
            };
            if must_be_gone && present {
                problems.push(format!(
                    "{address} still listed; its lease is {:?}",
                    lease.fate
                ));
            }
        }
        problems
    }
}

/// Serves a registry on the current runtime; the handle tells whether it
/// stopped (it never should).
pub(super) async fn serve(
    config: RegistryConfig,
) -> (String, JoinHandle<Result<(), tonic::transport::Error>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("local addr").to_string();
    let task = tokio::spawn(switchboard::registry::serve(
        listener,
        config,
        std::future::pending(),
    ));
    (address, task)
}

#[test]
pub(super) fn arbitrary_requests_get_ok_or_their_documented_status_and_watchers_stay_consistent() {
    count_panics();
    let runtime = runtime();
    let config = RegistryConfig {
        max_message_bytes: MAX_MESSAGE_BYTES,
        // The fuzzer is one connection registering as fast as it can.
        max_registrations_per_second: None,
        ..RegistryConfig::default()
    };
    let (harness, watchers, untouched, registry) = runtime.block_on(async {
        let (address, registry) = serve(config.clone()).await;
        let (other, _other_task) = serve(config.clone()).await;
        let mut client = registry_client(&address, STARTUP).await;
        let foreign_lease = registry_client(&other, STARTUP)
            .await
            .register(RegisterRequest {
                service: WATCHED[0].into(),
                address: "10.0.0.1:8000".into(),
                metadata: Metadata::new(),
                ttl_ms: 300_000,
            })
            .await
            .expect("register with the other registry")
            .into_inner()
            .lease_id;
        client
            .register(RegisterRequest {
                service: UNTOUCHED.into(),
                address: "10.1.1.1:1".into(),
                metadata: Metadata::from([("zone".into(), "a".into())]),
                ttl_ms: 300_000,
            })
            .await
            .expect("register the untouched endpoint");
        let epoch = client
            .resolve(ResolveRequest {
                service: UNTOUCHED.into(),
            })
            .await
            .expect("resolve")
            .into_inner()
            .epoch;
        let mut watchers = Vec::new();
        for service in WATCHED {
            watchers.push((
                service,
                first_message(Watcher::start(&client, service).await).await,
            ));
        }
        let untouched = first_message(Watcher::start(&client, UNTOUCHED).await).await;
        let harness = Harness {
            client,
            epoch,
            foreign_lease,
            model: RefCell::new(Model::default()),
        };
        (harness, watchers, untouched, registry)
    });

    let started = std::time::Instant::now();
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        // Shrinking replays against a registry whose state moved on; keep
        // it short.
        max_shrink_iters: 32,
        ..Config::default()
    });
    let result = runner.run(&prop::collection::vec(action(), 1..6), |actions| {
        runtime.block_on(async {
            for action in actions {
                harness.run(action).await?;
            }
            Ok(())
        })
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, actions)) => {
            // Inputs can be 100 KB long: show them cut.
            let mut shown = format!("{actions:#?}");
            if shown.len() > 4000 {
                let cut = (0..=4000)
                    .rev()
                    .find(|&i| shown.is_char_boundary(i))
                    .unwrap_or(0);
                shown.truncate(cut);
                shown.push_str("...");
            }
            panic!("{reason}\nminimal failing input (state carries over between cases): {shown}");
        }
        Err(TestError::Abort(reason)) => panic!("proptest aborted: {reason}"),
    }
    let fuzzing = started.elapsed();

    runtime.block_on(async {
        // Every watcher converges on what Resolve says, which is what the
        // model says; none broke the protocol on the way.
        let mut client = harness.client.clone();
        let mut last = Vec::new();
        let converged = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                last.clear();
                for (service, watcher) in &watchers {
                    let before = Instant::now();
                    let reply = client
                        .resolve(ResolveRequest {
                            service: (*service).into(),
                        })
                        .await
                        .expect("resolve a watched service")
                        .into_inner();
                    let after = Instant::now();
                    let view = watcher.view.borrow();
                    assert!(
                        view.violations.is_empty() && view.ended.is_none(),
                        "watcher of {service}: {}",
                        view.summary()
                    );
                    if view.version == Some(reply.version) {
                        let resolved: BTreeMap<String, Endpoint> = reply
                            .endpoints
                            .iter()
                            .map(|e| (e.address.clone(), e.clone()))
                            .collect();
                        assert_eq!(
                            view.endpoints, resolved,
                            "watcher of {service} at version {} holds another set than Resolve",
                            reply.version
                        );
                    } else {
                        last.push(format!(
                            "{service}: watcher at version {:?}, Resolve at {}",
                            view.version, reply.version
                        ));
                    }
                    for problem in harness.compare(service, &reply, before, after, true) {
                        last.push(format!("{service}: {problem}"));
                    }
                }
                if last.is_empty() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(converged.is_ok(), "watchers did not converge: {last:?}");

        let untouched = untouched.view.borrow();
        assert!(
            untouched.messages == 1
                && untouched.violations.is_empty()
                && untouched.ended.is_none()
                && untouched.endpoints.keys().eq(["10.1.1.1:1"]),
            "the untouched service's watcher saw something: {}",
            untouched.summary()
        );

        // Still serving as normal.
        let after = RegisterRequest {
            service: WATCHED[1].into(),
            address: "192.0.2.1:443".into(),
            metadata: Metadata::from([("after".into(), "fuzz".into())]),
            ttl_ms: 300_000,
        };
        client
            .register(after)
            .await
            .expect("a normal Register after the fuzzing");
        let mut resolved = resolve(&mut client, WATCHED[1]).await.expect("resolve");
        resolved.retain(|a| a == "192.0.2.1:443");
        assert_eq!(resolved, ["192.0.2.1:443"]);
        wait_for(
            "the watcher to see the last registration",
            Duration::from_secs(10),
            || {
                let seen = watchers[1]
                    .1
                    .view
                    .borrow()
                    .endpoints
                    .contains_key("192.0.2.1:443");
                async move { seen.then_some(()) }
            },
        )
        .await;
        assert!(!registry.is_finished(), "the registry stopped serving");
    });

    let model = harness.model.borrow();
    let views: Vec<String> = watchers
        .iter()
        .map(|(s, w)| {
            let v = w.view.borrow();
            format!(
                "{s}: {} messages ({} resets), {} endpoints",
                v.messages,
                v.resets,
                v.endpoints.len()
            )
        })
        .collect();
    eprintln!(
        "{CASES} cases in {fuzzing:?}; {} leases granted; outcomes {:?}; watchers {views:?}",
        model.leases.len(),
        model.outcomes
    );
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
}
