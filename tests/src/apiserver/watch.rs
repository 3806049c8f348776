//! Watches: history replay from a resourceVersion (410 when gone), bookmarks,
//! live changes, timeouts and injected cuts.

use super::*;

pub(crate) fn in_scope(c: &Change, resource: &str, ns: Option<&str>, p: &ListParams) -> bool {
    c.resource == resource
        && ns.is_none_or(|ns| c.object["metadata"]["namespace"] == ns)
        && matches(&c.object, p)
}

/// A watch: the changes after `resourceVersion` (or every object, as ADDED,
/// when it is empty or "0"), then live changes, one JSON object per line,
/// until `timeoutSeconds`. With `table` (kubectl's `get -w`), each event's
/// object is a one-row Table, as a real server prints it: the column
/// definitions in the first event only.
pub(crate) async fn watch(
    api: ApiServer,
    resource: &'static str,
    ns: Option<String>,
    p: ListParams,
    table: bool,
) -> Response {
    let (initial, rx, rv_now) = {
        let store = api.store.lock().expect("store");
        let rx = api.changes.subscribe();
        let from: Option<u64> = p
            .resource_version
            .as_deref()
            .filter(|v| !v.is_empty() && *v != "0")
            .and_then(|v| v.parse().ok());
        let oldest = store.history.first().map(|c| c.rv).unwrap_or(0);
        if let Some(from) = from {
            if from + 1 < oldest {
                // The real server's answer when history is gone: 410 Gone.
                return status(
                    StatusCode::GONE,
                    "Expired",
                    format!("too old resource version: {from} ({oldest})"),
                    json!({}),
                );
            }
        }
        let initial: Vec<Change> = match from {
            Some(from) => store
                .history
                .iter()
                .filter(|c| c.rv > from)
                .cloned()
                .collect(),
            None => store
                .objects
                .iter()
                .filter(|((r, _, _), _)| *r == resource)
                .map(|(_, o)| Change {
                    rv: store.rv,
                    kind: "ADDED",
                    resource,
                    object: o.clone(),
                })
                .collect(),
        };
        (initial, rx, store.rv)
    };
    let p = Arc::new(p);
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let printed = {
        let first = first.clone();
        move |object: &Value, rv: u64| -> Value {
            if !table {
                return object.clone();
            }
            let mut t = if resource == "nodes" {
                node_table(&[object], rv)
            } else {
                pod_table(std::slice::from_ref(object), rv)
            };
            if !first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                t["columnDefinitions"] = json!([]);
            }
            t
        }
    };
    let line = |kind: &str, object: &Value| {
        Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))
    };
    let mut head: Vec<Result<Bytes, Infallible>> = initial
        .iter()
        .filter(|c| in_scope(c, resource, ns.as_deref(), &p))
        .map(|c| Ok(line(c.kind, &printed(&c.object, c.rv))))
        .collect();
    if p.allow_watch_bookmarks == Some(true) {
        // A real server's bookmark carries the kind and apiVersion (clients need them).
        let (kind, api_version) = type_of(resource);
        head.push(Ok(line(
            "BOOKMARK",
            &json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv_now.to_string()}}),
        )));
    }
    let last_sent = initial.last().map(|c| c.rv).unwrap_or(rv_now);
    let filter = p.clone();
    let live = futures::stream::unfold(
        (rx, filter, last_sent, ns),
        move |(mut rx, filter, last, ns)| {
            let printed = printed.clone();
            async move {
                loop {
                    match rx.recv().await {
                        Ok(c) if c.rv > last && in_scope(&c, resource, ns.as_deref(), &filter) => {
                            let bytes = Bytes::from(format!(
                                "{}\n",
                                json!({"type": c.kind, "object": printed(&c.object, c.rv)})
                            ));
                            return Some((Ok::<_, Infallible>(bytes), (rx, filter, c.rv, ns)));
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        },
    );
    let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1800).min(3600));
    use futures::StreamExt;
    let mut cut = api.faults.cut_receiver();
    let stream = futures::stream::iter(head)
        .chain(live)
        .take_until(tokio::time::sleep(timeout))
        .take_until(async move {
            let _ = cut.recv().await;
        });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("valid response")
}
