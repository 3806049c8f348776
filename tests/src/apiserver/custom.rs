//! Custom resources: CustomResourceDefinitions (apiextensions.k8s.io/v1) and
//! the objects of the ones installed, served as a real API server serves
//! them: a CRD's group is in discovery and its resources answer only while
//! the CRD is installed (without it every path is the 404 Status a real
//! server sends), and `kubectl get` gets a Table of the CRD's
//! additionalPrinterColumns.

use super::*;

/// The CRD of a served custom resource (`volumes.longhorn.io`), if installed.
pub(crate) fn crd<'a>(store: &'a Store, resource: &str) -> Option<&'a Value> {
    store.get("customresourcedefinitions", "", resource)
}

/// Every installed CRD of `group`.
pub(crate) fn crds_of<'a>(store: &'a Store, group: &str) -> Vec<&'a Value> {
    store
        .list("customresourcedefinitions", None)
        .into_iter()
        .filter(|c| c["spec"]["group"] == group)
        .collect()
}

/// The groups (and their served version) of every installed CRD.
pub(crate) fn custom_groups(store: &Store) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vec![];
    for c in store.list("customresourcedefinitions", None) {
        let g = c["spec"]["group"].as_str().unwrap_or("").to_string();
        let v = c["spec"]["versions"][0]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if !out.iter().any(|(x, _)| *x == g) {
            out.push((g, v));
        }
    }
    out
}

fn not_served() -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource".into(),
        json!({}),
    )
}

/// `/apis/{group}/{version}`: the group's resources, from its CRDs.
pub(crate) async fn custom_resources(
    State(api): State<ApiServer>,
    Path((group, version)): Path<(String, String)>,
) -> Response {
    let store = api.store.lock().expect("store");
    let crds: Vec<&Value> = crds_of(&store, &group)
        .into_iter()
        .filter(|c| c["spec"]["versions"][0]["name"] == version.as_str())
        .collect();
    if crds.is_empty() {
        return not_served();
    }
    let resources: Vec<Value> = crds
        .iter()
        .map(|c| {
            let n = &c["spec"]["names"];
            json!({"name": n["plural"], "singularName": n["singular"], "namespaced": c["spec"]["scope"] == "Namespaced",
                   "kind": n["kind"], "verbs": ["get", "list", "watch"], "shortNames": n["shortNames"]})
        })
        .collect();
    json_response(
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{group}/{version}"), "resources": resources}),
    )
}

/// Evaluates the JSONPath forms CRD printer columns use: `.a.b`, `.a[0].b`
/// and `.a[?(@.type=='X')].b`.
pub(crate) fn json_path(obj: &Value, path: &str) -> Value {
    let mut cur = vec![obj.clone()];
    let mut rest = path.trim_start_matches('.');
    while !rest.is_empty() {
        let (seg, tail) = match rest.find(['.', '[']) {
            Some(0) if rest.starts_with('[') => {
                let end = rest.find(']').map(|e| e + 1).unwrap_or(rest.len());
                (&rest[..end], &rest[end..])
            }
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        rest = tail.trim_start_matches('.');
        cur = if let Some(inner) = seg.strip_prefix("[?(@.").and_then(|s| s.strip_suffix(")]")) {
            let (field, want) = inner.split_once("==").unwrap_or((inner, ""));
            let want = want.trim_matches('\'');
            cur.iter()
                .flat_map(|v| v.as_array().cloned().unwrap_or_default())
                .filter(|v| v[field] == want)
                .collect()
        } else if let Some(i) = seg.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            let i: usize = i.parse().unwrap_or(usize::MAX);
            cur.iter().filter_map(|v| v.get(i).cloned()).collect()
        } else {
            cur.iter().filter_map(|v| v.get(seg).cloned()).collect()
        };
    }
    cur.into_iter().next().unwrap_or(Value::Null)
}

/// A Table of custom resources with their CRD's printer columns (Name first).
pub(crate) fn custom_table(crd: &Value, items: &[Value], rv: u64) -> Value {
    let cols = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut columns: Vec<(String, String, u8)> = vec![("Name".into(), "string".into(), 0)];
    for c in &cols {
        columns.push((
            c["name"].as_str().unwrap_or("").into(),
            c["type"].as_str().unwrap_or("string").into(),
            c["priority"].as_u64().unwrap_or(0) as u8,
        ));
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            for c in &cols {
                let v = json_path(o, c["jsonPath"].as_str().unwrap_or(""));
                cells.push(match (c["type"].as_str(), v) {
                    (Some("date"), Value::String(s)) => json!(age(&s)),
                    (_, Value::Null) => json!(null),
                    (_, v) => v,
                });
            }
            row(json!(cells), o)
        })
        .collect();
    let cols: Vec<(&str, &str, u8)> = columns
        .iter()
        .map(|(n, t, p)| {
            (
                n.as_str(),
                if t == "date" { "string" } else { t.as_str() },
                *p,
            )
        })
        .collect();
    table(&cols, rows, rv)
}

async fn custom_list(
    api: ApiServer,
    resource: &'static str,
    ns: Option<String>,
    p: ListParams,
    headers: HeaderMap,
) -> Response {
    {
        let store = api.store.lock().expect("store");
        let Some(crd) = crd(&store, resource).cloned() else {
            return not_served();
        };
        if wants_table(&headers) && !is_watch(&p) {
            let items: Vec<Value> = store
                .list(resource, ns.as_deref())
                .into_iter()
                .filter(|o| matches(o, &p))
                .cloned()
                .collect();
            return json_response(&custom_table(&crd, &items, store.rv));
        }
    }
    list_or_watch(api, resource, ns, p, &headers).await
}

pub(crate) async fn custom_list_all<const R: usize>(
    State(api): State<ApiServer>,
    Query(p): Query<ListParams>,
    headers: HeaderMap,
) -> Response {
    custom_list(api, RESOURCES[R], None, p, headers).await
}

pub(crate) async fn custom_list_in<const R: usize>(
    State(api): State<ApiServer>,
    Path(ns): Path<String>,
    Query(p): Query<ListParams>,
    headers: HeaderMap,
) -> Response {
    custom_list(api, RESOURCES[R], Some(ns), p, headers).await
}

pub(crate) async fn custom_get<const R: usize>(
    State(api): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let resource = RESOURCES[R];
    let store = api.store.lock().expect("store");
    let Some(crd) = crd(&store, resource).cloned() else {
        return not_served();
    };
    match store.get(resource, &ns, &name) {
        Some(o) if wants_table(&headers) => {
            json_response(&custom_table(&crd, std::slice::from_ref(o), store.rv))
        }
        Some(o) => json_response(o),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{resource} \"{name}\" not found"),
            json!({"name": name, "group": crd["spec"]["group"], "kind": crd["spec"]["names"]["plural"]}),
        ),
    }
}
