use std::collections::BTreeSet;
use std::time::Duration;

use ferry_api::JobEventKind;
use migrate_core::{
    Action, BaseReport, Event, IntegrityReport, MemoryReport, Migration, Phase, PrecopyPolicy,
    Report, RoundStats, TrackingFallback, TrackingReport,
};
use serde::Serialize;
use serde_json::{json, Value};

use super::*;

/// docs/openapi.json, from this crate's directory.
const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");

/// The document as committed: pretty JSON and a final newline.
fn rendered() -> String {
    let mut text = serde_json::to_string_pretty(&openapi()).expect("the document serializes");
    text.push('\n');
    text
}

#[test]
fn the_committed_openapi_document_is_what_the_code_generates() {
    let generated = rendered();
    if std::env::var_os("FERRY_UPDATE_OPENAPI").is_some_and(|v| v != "0") {
        std::fs::write(COMMITTED, &generated).expect("writing docs/openapi.json");
        return;
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(generated.lines().count()));
        panic!(
            "docs/openapi.json differs from what the API's types and routes generate (first at \
             line {}: committed {:?}, generated {:?}); regenerate it with \
             `FERRY_UPDATE_OPENAPI=1 cargo test -p ferry-agent openapi` and commit it",
            line + 1,
            committed.lines().nth(line).unwrap_or("<end>"),
            generated.lines().nth(line).unwrap_or("<end>"),
        );
    }
}

#[test]
fn openapi_documents_every_route_and_nothing_else() {
    let doc = openapi();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            let methods = item.as_object().expect("a path item").keys();
            methods.map(move |m| (m.to_ascii_uppercase(), path.clone()))
        })
        .collect();
    let routes: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, routes);
    assert_eq!(doc["info"]["title"], "Ferry agent API");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn openapi_operations_declare_parameters_bodies_and_errors() {
    let doc = openapi();
    let mut ids = BTreeSet::new();
    let tags: BTreeSet<&str> = doc["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(tag("/v1/metrics"), "host");
    for (method, path) in ROUTES {
        let op = &doc["paths"][path][method.to_ascii_lowercase()];
        let what = format!("{method} {path}");
        assert!(
            ids.insert(op["operationId"].to_string()),
            "{what}: id twice"
        );
        assert!(op["description"].as_str().is_some_and(|d| !d.is_empty()));
        assert!(tags.contains(op["tags"][0].as_str().unwrap()), "{what}");
        // Every `{param}` of the path is declared, and nothing else is in the path.
        let in_path: BTreeSet<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        let declared: BTreeSet<&str> = params
            .iter()
            .filter(|p| p["in"] == "path")
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(in_path, declared, "{what}");
        let responses = op["responses"].as_object().expect("responses");
        let ok: Vec<&String> = responses.keys().filter(|s| s.starts_with('2')).collect();
        assert_eq!(ok.len(), 1, "{what}: one success status");
        for status in ["405", "500"] {
            assert!(responses.contains_key(status), "{what}: no {status}");
        }
        if !op["requestBody"].is_null() {
            for status in ["400", "413"] {
                assert!(responses.contains_key(status), "{what}: no {status}");
            }
        }
        if !in_path.is_empty() {
            assert!(responses.contains_key("404"), "{what}: no 404");
        }
    }
    let status = |m: &str, p: &str| {
        let op = &doc["paths"][p][m];
        let ok = op["responses"].as_object().unwrap().keys();
        ok.filter(|s| s.starts_with('2'))
            .cloned()
            .collect::<String>()
    };
    assert_eq!(status("post", "/v1/containers"), "201");
    assert_eq!(status("post", "/v1/images"), "201");
    assert_eq!(status("post", "/v1/containers/{name}/migrate"), "202");
    let events = &doc["paths"]["/v1/jobs/{id}/events"]["get"]["responses"]["200"]["content"];
    assert_eq!(
        events["application/x-ndjson"]["schema"]["$ref"],
        "#/components/schemas/JobEvent"
    );
    let query = |m: &str, p: &str| -> Vec<(String, Value)> {
        doc["paths"][p][m]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["in"] == "query")
            .map(|p| (p["name"].as_str().unwrap().to_string(), p["schema"].clone()))
            .collect()
    };
    let dirty = query("get", "/v1/containers/{name}/dirty-rate");
    assert_eq!(dirty[0].0, "ms");
    assert_eq!(
        (
            &dirty[0].1["default"],
            &dirty[0].1["minimum"],
            &dirty[0].1["maximum"]
        ),
        (&json!(1000), &json!(10), &json!(60000))
    );
    assert_eq!(dirty[1].0, "throttle");
    let stop = query("post", "/v1/containers/{name}/stop");
    assert_eq!(stop[0].0, "timeout_s");
    assert_eq!(stop[0].1["default"], 10);
}

#[test]
fn openapi_has_an_answer_for_a_route_that_is_not_json() {
    let mut s = Schemas::new();
    let metrics = operation("GET", "/v1/metrics", &mut s)
        .expect("the metrics route")
        .into_json("/v1/metrics", &json!({}));
    let content = &metrics["responses"]["200"]["content"];
    assert_eq!(content["text/plain"]["schema"]["type"], "string");
    assert!(operation("GET", "/v1/nothing", &mut s).is_none());
}

#[test]
fn openapi_refs_all_resolve() {
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match v.as_str() {
                        Some(r) if k == "$ref" => out.push(r),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let doc = openapi();
    let mut all = vec![];
    refs(&doc, &mut all);
    assert!(all.len() > 50, "{} refs", all.len());
    for r in all {
        let pointer = r.strip_prefix('#').expect("a local ref");
        assert!(doc.pointer(pointer).is_some(), "{r} points nowhere");
    }
}

/// A validator of values against the document's schema `name`.
fn validator(doc: &Value, name: &str) -> jsonschema::Validator {
    let schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": format!("{SCHEMAS}{name}"),
        "components": doc["components"],
    });
    jsonschema::draft202012::new(&schema).unwrap_or_else(|e| panic!("schema {name}: {e}"))
}

/// Checks that `value`, serialized as the agent does, is valid against schema `name`.
fn valid(doc: &Value, name: &str, value: &impl Serialize) -> Value {
    let json = serde_json::to_value(value).expect("serializes");
    let v = validator(doc, name);
    let errors: Vec<String> = v
        .iter_errors(&json)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{name}: {errors:#?}\n{json:#}");
    json
}

fn invalid(doc: &Value, name: &str, json: Value) {
    assert!(
        !validator(doc, name).is_valid(&json),
        "{name} accepts {json:#}"
    );
}

/// A pre-copy migration through two rounds to its end, as the source drives it.
fn precopy_report() -> Report {
    let ms = Duration::from_millis;
    let mut m = Migration::new("h1-web-3", "web", "h1", "h2").with_precopy(PrecopyPolicy {
        downtime_budget_ms: 20.0,
        ..PrecopyPolicy::default()
    });
    let mut now = 0;
    let mut actions = m.handle(Event::Start, ms(now)).unwrap();
    m.set_started_unix_ms(1.7e12);
    m.set_dirty_tracking("uffd-wp");
    let mut tracking = TrackingReport::default();
    tracking.tracked("uffd-wp");
    tracking.tracked("page-hash");
    tracking.fell_back(TrackingFallback {
        pid: 42,
        command: "worker".into(),
        method: "page-hash".into(),
        reason: "refused by a fault hook".into(),
    });
    m.set_tracking(tracking);
    // Round 1 leaves 3000 pages dirty, round 2 20, which fits the budget: the freeze.
    let dirty = [3000, 20];
    while !m.state().is_terminal() {
        now += 10;
        let event = match actions.first() {
            Some(Action::CopyRound { round, .. }) => Event::RoundDone(RoundStats {
                pages_sent: if *round == 1 { 65536 } else { 3000 },
                bytes_sent: if *round == 1 { 1 << 28 } else { 3000 * 4096 },
                dirty_pages: dirty[(*round as usize - 1).min(1)],
                duration: ms(if *round == 1 { 900 } else { 40 }),
                waited: Duration::ZERO,
                link_bytes_s: None,
            }),
            _ => Event::Done { bytes: 1000 },
        };
        actions = m.handle(event, ms(now)).unwrap();
    }
    m.set_rootfs_digest(&"ab".repeat(32));
    m.set_frozen_round_trips(3);
    m.set_images_delivered_ms(4.5);
    m.set_base(BaseReport {
        image: "alpine".into(),
        tree: "cd".repeat(32),
        held: false,
        chunks: 40,
        chunks_sent: 12,
        chunk_bytes: 1 << 20,
        bytes_sent: (1 << 20) + 900,
        ms: 35.0,
    });
    m.set_memory(&MemoryReport {
        restore: "lazy".into(),
        final_dirty_pages: 20,
        eager_pages: 3,
        lazy_pages: 65533,
        fill_pages: Some(65533),
        fill_ms: Some(210.0),
        fill_mib_s: Some(1200.0),
        integrity: Some(IntegrityReport {
            pages_checked: 65533,
            ..IntegrityReport::default()
        }),
        ..MemoryReport::default()
    });
    m.warn("integrity: nothing to say".into());
    m.finalize()
}

#[test]
fn openapi_schemas_accept_what_the_agent_writes_and_refuse_other_shapes() {
    let doc = openapi();
    let report = precopy_report();
    assert!(!report.rounds.is_empty() && report.memory.is_some());
    let job = ferry_api::JobInfo {
        id: report.id.clone(),
        state: migrate_core::State::Done,
        report: report.clone(),
    };
    let json = valid(&doc, "JobInfo", &job);
    assert_eq!(json["report"]["result"], "completed");
    assert!(json["report"]["rounds"][0]["decision"]["decision"].is_string());

    // A job that rolled back, and one just started.
    let mut m = Migration::new("h1-web-4", "web", "h1", "h2");
    m.handle(Event::Start, Duration::ZERO).unwrap();
    let failed = Event::Failed {
        error: "destination unreachable".into(),
    };
    m.handle(failed, Duration::from_millis(5)).unwrap();
    while !m.state().is_terminal() {
        m.handle(Event::Done { bytes: 0 }, Duration::from_millis(9))
            .unwrap();
    }
    let started = ferry_api::JobInfo {
        id: "h1-web-5".into(),
        state: m.state(),
        report: m.report().clone(),
    };
    valid(&doc, "JobInfo", &started);
    let rolled_back = m.finalize();
    let json = valid(&doc, "Report", &rolled_back);
    assert_eq!(json["result"], "rolled_back");

    for kind in [
        JobEventKind::PhaseStarted { phase: Phase::Dump },
        JobEventKind::PhaseDone {
            phase: Phase::PreCopy,
            duration_ms: 900.0,
            bytes: 1 << 28,
        },
        JobEventKind::PhaseFailed {
            phase: Phase::Restore,
            error: "criu restore failed".into(),
        },
        JobEventKind::Progress {
            phase: Phase::PreCopy,
            elapsed_ms: 1000.5,
            bytes: 1 << 27,
            planned_bytes: Some(1 << 28),
        },
        JobEventKind::Round {
            round: report.rounds[0].clone(),
        },
        JobEventKind::Committed,
        JobEventKind::Finished {
            report: Box::new(report.clone()),
        },
    ] {
        let event = ferry_api::JobEvent {
            seq: 4,
            t_ms: 12.5,
            kind,
        };
        valid(&doc, "JobEvent", &event);
    }
    invalid(&doc, "JobEvent", json!({"seq": 1, "t_ms": 2.0}));
    invalid(
        &doc,
        "JobEvent",
        json!({"seq": 1, "t_ms": 2.0, "event": "phase_started", "phase": "nap"}),
    );

    let error = ApiError {
        code: "unknown_container".into(),
        message: "unknown container \"x\" on h1: `ferry ps` lists containers".into(),
    };
    valid(&doc, "ApiError", &error);
    invalid(&doc, "ApiError", json!({"code": "conflict"}));

    let spec = ferry_api::ContainerSpec {
        name: "web".into(),
        ip: "10.232.0.10".parse().unwrap(),
        mac: ferry_api::mac_for_ip("10.232.0.10".parse().unwrap()),
        prefix_len: 24,
        ipv6: Some(ferry_api::ipv6_for_ip("10.232.0.10".parse().unwrap())),
        args: vec!["nginx".into()],
        image: Some(ferry_api::ImageRef {
            name: "nginx".into(),
            tree: "ef".repeat(32),
            config: Some(shared_fs::oci::ImageConfig {
                cmd: vec!["nginx".into()],
                exposed_ports: vec!["80/tcp".into()],
                ..Default::default()
            }),
        }),
        process: Default::default(),
        resources: ferry_api::Resources {
            memory_bytes: Some(64 << 20),
            cpu_millis: None,
        },
        published: vec![ferry_api::Published {
            host_port: 8080,
            port: 80,
        }],
    };
    let info = ContainerInfo {
        spec,
        host: "h1".into(),
        state: "running".into(),
        pid: Some(4242),
        memory_bytes: Some(8 << 20),
    };
    let json = valid(&doc, "ContainerInfo", &info);
    assert_eq!(json["ipv6"], "fd00:f3::ae8:a");
    invalid(&doc, "ContainerInfo", json!({"name": "web"}));

    // Requests: what a client sends, read with the request's schema.
    let create = CreateContainer {
        name: "web".into(),
        ip: Some("10.232.0.10".parse().unwrap()),
        image: Some("nginx".into()),
        env: vec!["A=1".into()],
        cpus: Some(1.5),
        publish: vec!["8080:80".parse().unwrap()],
        memory_bytes: Some(64 << 20),
        ..Default::default()
    };
    valid(&doc, "CreateContainer", &create);
    valid(
        &doc,
        "CreateContainer",
        &json!({"name": "x", "args": ["sleep", "9"]}),
    );
    invalid(
        &doc,
        "CreateContainer",
        json!({"name": "x", "args": ["sleep", "9"], "memory": "1g"}),
    );
    invalid(&doc, "CreateContainer", json!({"args": ["sleep", "9"]}));
    valid(
        &doc,
        "MigrateRequest",
        &json!({"to": "h2", "mode": "pre-copy", "precopy": {"max_rounds": 5, "when_stuck": "post-copy"}}),
    );
    invalid(&doc, "MigrateRequest", json!({"to": "h2", "mode": "fast"}));
    invalid(
        &doc,
        "MigrateRequest",
        json!({"to": "h2", "mod": "pre-copy"}),
    );
    invalid(
        &doc,
        "MigrateRequest",
        json!({"to": "h2", "faults": {"pause_in_dump": 1}}),
    );
    valid(&doc, "ResolveRequest", &json!({"outcome": "resume_here"}));
    valid(
        &doc,
        "ImportImage",
        &ImportImage {
            name: "alpine".into(),
            path: "/srv/alpine".into(),
            oci_ref: None,
        },
    );

    // Answers of the other routes.
    valid(
        &doc,
        "HostInfo",
        &HostInfo {
            host: "h1".into(),
            underlay_ip: "10.0.0.1".parse().unwrap(),
            criu: Some("4.0".into()),
            criu_error: None,
            peers: vec!["h2".into()],
            targets: vec!["h2".into()],
            cgroups: "cgroup v2 (unified)".into(),
            mem_available_bytes: 3 << 30,
            cpus: 2,
            load1: 0.5,
            containers: 1,
        },
    );
    valid(
        &doc,
        "ResolveAnswer",
        &ResolveAnswer {
            job: "h1-web-3".into(),
            container: "web".into(),
            destination: "h2".into(),
            outcome: ferry_api::Resolution::ResumeHere,
        },
    );
    valid(
        &doc,
        "ExecResult",
        &ExecResult {
            exit_code: None,
            stdout: "hi\n".into(),
            stderr: String::new(),
            truncated: false,
            output_held_open: true,
        },
    );
    valid(
        &doc,
        "DirtyRate",
        &DirtyRate {
            container: "web".into(),
            host: "h1".into(),
            method: "uffd-wp".into(),
            processes: 2,
            interval_ms: 1000.0,
            dirty_pages: 300,
            new_mapping_pages: 0,
            mib_per_s: 1.2,
            throttle_pct: 20,
            allowed_cores: Some(0.8),
        },
    );
    let record = ImageRecord {
        name: "alpine".into(),
        tree: "01".repeat(32),
        source: "oci:/srv/alpine".into(),
        created_unix_ms: 1_700_000_000_000,
        bytes: 8 << 20,
        entries: 500,
        config: None,
    };
    valid(
        &doc,
        "Imported",
        &Imported {
            image: record.clone(),
            format: "oci".into(),
            stats: Default::default(),
        },
    );
    valid(
        &doc,
        "ImageList",
        &ImageList {
            host: "h1".into(),
            images: vec![record],
            usage: Default::default(),
        },
    );
    valid(&doc, "GcStats", &GcStats::default());
    valid(
        &doc,
        "ContainerDeleted",
        &ContainerDeleted {
            deleted: "web".into(),
        },
    );
    valid(
        &doc,
        "PageStoreInfo",
        &PageStoreInfo {
            pages: 10,
            max_pages: 1 << 20,
        },
    );
    valid(
        &doc,
        "PagesForgotten",
        &PagesForgotten {
            forgotten: 10,
            kept: 0,
        },
    );
}

/// A type serde reads with a default but always writes gets two schemas, and the request's
/// `$ref`s point at the request's.
#[test]
fn openapi_names_a_type_twice_when_it_reads_differently_from_how_it_is_written() {
    #[derive(Serialize, serde::Deserialize, JsonSchema)]
    struct Inner {
        #[serde(default)]
        n: u32,
    }
    #[derive(Serialize, serde::Deserialize, JsonSchema)]
    struct Outer {
        inner: Inner,
    }
    let mut s = Schemas::new();
    let body = s.body::<Outer>();
    let answer = s.answer::<Outer>();
    assert_eq!(body, answer, "both refer to `Outer` before the merge");
    let read = s.read.take_definitions(true);
    let write = s.write.take_definitions(true);
    assert_ne!(
        read["Inner"], write["Inner"],
        "`n` is required when written"
    );
    let mut op = Operation {
        body: Some(body),
        ..operation("GET", "/v1/host", &mut s).unwrap()
    };
    let all = merge(read, write, |from, to| op.rename_request_ref(from, to));
    let names: BTreeSet<&str> = all.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from(["Inner", "InnerInput", "Outer", "OuterInput"])
    );
    assert_eq!(
        all["OuterInput"]["properties"]["inner"]["$ref"],
        "#/components/schemas/InnerInput"
    );
    assert_eq!(
        all["Outer"]["properties"]["inner"]["$ref"],
        "#/components/schemas/Inner"
    );
    assert_eq!(op.body.unwrap()["$ref"], "#/components/schemas/OuterInput");
}

#[test]
fn openapi_descriptions_read_rustdoc_links_as_plain_code() {
    assert_eq!(
        unlinked(json!({"d": ["see [`FaultHooks::pause_in_phase`] and [`Report`]"]})),
        json!({"d": ["see `pause_in_phase` and `Report`"]})
    );
    let kept = "a [`link`](https://example.org) and [`unclosed";
    assert_eq!(unlinked(json!(kept)), json!(kept));
}
