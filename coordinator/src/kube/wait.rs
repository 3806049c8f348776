//! Waiting on the API by watching, never by sleeping: list once, then watch
//! from that list's resourceVersion. A watch stream that ends (the server's
//! timeout, a cut connection, an API server restart) is resumed from the last
//! resourceVersion seen; a 410 Gone (history compacted) re-lists. Errors in
//! between back off briefly and are remembered for the timeout message.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::Resource;
use serde::de::DeserializeOwned;

use super::{Kube, KubeError};

/// Which objects to watch.
#[derive(Debug, Clone, Default)]
pub struct Selectors {
    pub fields: Option<String>,
    pub labels: Option<String>,
}

/// How long one watch request may stay open before the server ends it.
const WATCH_SECONDS: u32 = 290;

fn key<K: Resource>(o: &K) -> String {
    let m = o.meta();
    format!(
        "{}/{}",
        m.namespace.as_deref().unwrap_or(""),
        m.name.as_deref().unwrap_or("")
    )
}

/// Waits until `check` accepts the selected objects (keyed `namespace/name`),
/// or fails after `deadline` with the last reason `check` gave (or the last
/// error). `check` returns `Err(why not yet)`.
pub async fn until<K, F>(
    kube: &Kube,
    api: &Api<K>,
    sel: &Selectors,
    what: &str,
    deadline: Duration,
    mut check: F,
) -> Result<(), KubeError>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    F: FnMut(&BTreeMap<String, K>) -> Result<(), String>,
{
    let mut last = String::from("nothing seen yet");
    let run = async {
        let mut objects: BTreeMap<String, K> = BTreeMap::new();
        let mut rv: Option<String> = None;
        let mut backoff = Duration::from_millis(50);
        let pause = |backoff: &mut Duration| {
            let d = *backoff;
            *backoff = (*backoff * 2).min(Duration::from_secs(2));
            tokio::time::sleep(d)
        };
        loop {
            let Some(from) = rv.clone() else {
                let lp = ListParams {
                    field_selector: sel.fields.clone(),
                    label_selector: sel.labels.clone(),
                    ..ListParams::default()
                };
                match kube.call(what, api.list(&lp)).await {
                    Ok(list) => {
                        objects = list.items.into_iter().map(|o| (key(&o), o)).collect();
                        rv = list.metadata.resource_version.filter(|v| !v.is_empty());
                        match check(&objects) {
                            Ok(()) => return,
                            Err(why) => last = why,
                        }
                        backoff = Duration::from_millis(50);
                        if rv.is_none() {
                            last = format!("{last} (the list had no resourceVersion)");
                            pause(&mut backoff).await;
                        }
                    }
                    Err(e) => {
                        last = e.to_string();
                        pause(&mut backoff).await;
                    }
                }
                continue;
            };
            let mut wp = WatchParams::default().timeout(WATCH_SECONDS);
            wp.field_selector = sel.fields.clone();
            wp.label_selector = sel.labels.clone();
            let stream = match tokio::time::timeout(kube.api_timeout, api.watch(&wp, &from)).await {
                Ok(Ok(s)) => s,
                Ok(Err(kube::Error::Api(s))) if s.code == 410 => {
                    tracing::debug!(what, "resourceVersion {from} is gone; listing again");
                    rv = None;
                    continue;
                }
                Ok(Err(e)) => {
                    last = kube.error(what.to_string(), e).to_string();
                    pause(&mut backoff).await;
                    continue;
                }
                Err(_) => {
                    last = format!(
                        "{what}: opening a watch took longer than {:?}",
                        kube.api_timeout
                    );
                    continue;
                }
            };
            let mut stream = std::pin::pin!(stream);
            let mut failed = false;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(WatchEvent::Added(o)) | Ok(WatchEvent::Modified(o)) => {
                        rv = o.meta().resource_version.clone().or(rv);
                        objects.insert(key(&o), o);
                    }
                    Ok(WatchEvent::Deleted(o)) => {
                        rv = o.meta().resource_version.clone().or(rv);
                        objects.remove(&key(&o));
                    }
                    Ok(WatchEvent::Bookmark(b)) => {
                        rv = Some(b.metadata.resource_version);
                        continue;
                    }
                    Ok(WatchEvent::Error(s)) if s.code == 410 => {
                        rv = None;
                        break;
                    }
                    Ok(WatchEvent::Error(s)) => {
                        last =
                            format!("{what}: watch error {} {}: {}", s.code, s.reason, s.message);
                        failed = true;
                        break;
                    }
                    Err(e) => {
                        last = kube.error(what.to_string(), e).to_string();
                        failed = true;
                        break;
                    }
                }
                backoff = Duration::from_millis(50);
                match check(&objects) {
                    Ok(()) => return,
                    Err(why) => last = why,
                }
            }
            tracing::debug!(what, rv = ?rv, failed, "watch ended; resuming");
            if failed {
                // Never spin on a stream that fails straight away.
                pause(&mut backoff).await;
            }
        }
    };
    match tokio::time::timeout(deadline, run).await {
        Ok(()) => Ok(()),
        Err(_) => Err(KubeError::WaitTimedOut {
            what: what.to_string(),
            after: deadline,
            last,
        }),
    }
}
