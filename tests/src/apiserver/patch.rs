//! Node patches: RFC 7386 merge, strategic merge (keyed lists), RFC 6902.

use super::*;

/// Lists merged by key in a strategic-merge patch of a Node.
pub(crate) const MERGE_KEYS: &[(&str, &str)] = &[
    ("conditions", "type"),
    ("taints", "key"),
    ("addresses", "type"),
];

/// RFC 7386 merge patch; with `strategic`, the keyed lists above merge by key.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value, strategic: bool) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        if k.starts_with('$') {
            continue; // strategic-merge directives ($retainKeys, $setElementOrder) need nothing here
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        let key = MERGE_KEYS
            .iter()
            .find(|(list, _)| list == k)
            .map(|(_, key)| *key);
        match (
            strategic,
            key,
            v.as_array(),
            t.get_mut(k).and_then(|x| x.as_array_mut()),
        ) {
            (true, Some(key), Some(items), Some(existing)) => {
                for item in items {
                    match existing.iter_mut().find(|e| e[key] == item[key]) {
                        Some(e) => merge_patch(e, item, true),
                        None => existing.push(item.clone()),
                    }
                }
            }
            _ => merge_patch(t.entry(k.clone()).or_insert(Value::Null), v, strategic),
        }
    }
}

/// RFC 6902 JSON patch: add, remove, replace, test.
pub(crate) fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops
        .as_array()
        .ok_or("a JSON patch is an array of operations")?;
    for op in ops {
        let path = op["path"]
            .as_str()
            .ok_or("every operation needs a \"path\"")?;
        let (parent, last) = match path.rfind('/') {
            Some(i) => (
                &path[..i],
                path[i + 1..].replace("~1", "/").replace("~0", "~"),
            ),
            None => return Err(format!("invalid path {path:?}")),
        };
        match op["op"].as_str() {
            Some("test") => {
                if target.pointer(path) != Some(&op["value"]) {
                    return Err(format!("test operation failed at {path}"));
                }
            }
            Some(kind @ ("add" | "replace")) => {
                let value = op
                    .get("value")
                    .ok_or("add/replace need a \"value\"")?
                    .clone();
                let parent_v = target
                    .pointer_mut(parent)
                    .ok_or_else(|| format!("{parent:?} does not exist"))?;
                match parent_v {
                    Value::Object(m) => {
                        if kind == "replace" && !m.contains_key(&last) {
                            return Err(format!("replace: {path} does not exist"));
                        }
                        m.insert(last, value);
                    }
                    Value::Array(a) if last == "-" => a.push(value),
                    Value::Array(a) => {
                        let i: usize = last
                            .parse()
                            .map_err(|_| format!("bad array index in {path}"))?;
                        if kind == "replace" && i < a.len() {
                            a[i] = value;
                        } else if i <= a.len() {
                            a.insert(i, value);
                        } else {
                            return Err(format!("index out of range in {path}"));
                        }
                    }
                    _ => return Err(format!("{parent:?} is not an object or array")),
                }
            }
            Some("remove") => {
                let parent_v = target
                    .pointer_mut(parent)
                    .ok_or_else(|| format!("{parent:?} does not exist"))?;
                let removed = match parent_v {
                    Value::Object(m) => m.remove(&last).is_some(),
                    Value::Array(a) => last
                        .parse::<usize>()
                        .ok()
                        .filter(|i| *i < a.len())
                        .map(|i| a.remove(i))
                        .is_some(),
                    _ => false,
                };
                if !removed {
                    return Err(format!("remove: {path} does not exist"));
                }
            }
            other => return Err(format!("unsupported operation {other:?}")),
        }
    }
    Ok(())
}

pub(crate) async fn patch_node(
    State(api): State<ApiServer>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ctype = headers
        .get("content-type")
        .and_then(|c| c.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("the body of the request was in an unknown format: {e}"),
                json!({}),
            )
        }
    };
    let mut store = api.store.lock().expect("store");
    let Some(current) = store.get("nodes", "", &name).cloned() else {
        return not_found("nodes", &name);
    };
    let mut next = current.clone();
    let result = match ctype.as_str() {
        "application/merge-patch+json" => {
            merge_patch(&mut next, &patch, false);
            Ok(())
        }
        "application/strategic-merge-patch+json" => {
            merge_patch(&mut next, &patch, true);
            Ok(())
        }
        "application/json-patch+json" => json_patch(&mut next, &patch),
        other => {
            return status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {other:?})"),
                json!({}),
            )
        }
    };
    if let Err(e) = result {
        // kubectl prints an Invalid status through its causes.
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("nodes \"{name}\" is invalid: {e}"),
            json!({"name": name, "kind": "nodes", "causes": [{"reason": "FieldValueInvalid", "message": e, "field": "patch"}]}),
        );
    }
    // Optimistic concurrency: a patch that names a resourceVersion must name the current one.
    let sent_rv = patch
        .get("metadata")
        .and_then(|m| m.get("resourceVersion"))
        .and_then(|r| r.as_str());
    if let Some(rv) = sent_rv {
        if Some(rv) != current["metadata"]["resourceVersion"].as_str() {
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                format!("Operation cannot be fulfilled on nodes \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
                json!({"name": name, "kind": "nodes"}),
            );
        }
    }
    if next["metadata"]["name"] != current["metadata"]["name"] {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name cannot be changed".into(),
            json!({"name": name, "kind": "nodes"}),
        );
    }
    if next == current {
        return json_response(&current);
    }
    let stored = api.commit(&mut store, "MODIFIED", "nodes", next);
    json_response(&stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patches_delete_with_null_and_strategic_ones_merge_conditions_by_type() {
        let mut n = node_object("a", false, false);
        merge_patch(&mut n, &json!({"spec": {"unschedulable": true}}), true);
        assert_eq!(n["spec"]["unschedulable"], true);
        merge_patch(&mut n, &json!({"spec": {"unschedulable": null}}), true);
        assert!(n["spec"].get("unschedulable").is_none());
        merge_patch(
            &mut n,
            &json!({"status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "MemoryPressure", "status": "False"}]}}),
            true,
        );
        let conds = n["status"]["conditions"].as_array().unwrap();
        assert_eq!(conds.len(), 2, "merged by type, not replaced");
        assert_eq!(conds[0]["status"], "True");
        assert_eq!(
            conds[0]["reason"], "KubeletNotReady",
            "fields not in the patch stay"
        );
        merge_patch(
            &mut n,
            &json!({"status": {"conditions": [{"type": "Ready"}]}}),
            false,
        );
        assert_eq!(
            n["status"]["conditions"].as_array().unwrap().len(),
            1,
            "a plain merge patch replaces lists"
        );
    }

    #[test]
    fn json_patches_follow_rfc_6902() {
        let mut n = node_object("a", false, true);
        json_patch(
            &mut n,
            &json!([{"op": "add", "path": "/metadata/labels/x~1y", "value": "1"}]),
        )
        .unwrap();
        assert_eq!(n["metadata"]["labels"]["x/y"], "1");
        json_patch(&mut n, &json!([{"op": "test", "path": "/metadata/name", "value": "a"}, {"op": "remove", "path": "/metadata/labels/x~1y"}])).unwrap();
        assert!(n["metadata"]["labels"].get("x/y").is_none());
        assert!(json_patch(
            &mut n,
            &json!([{"op": "test", "path": "/metadata/name", "value": "b"}])
        )
        .unwrap_err()
        .contains("test operation failed"));
        assert!(json_patch(
            &mut n,
            &json!([{"op": "replace", "path": "/spec/nope", "value": 1}])
        )
        .unwrap_err()
        .contains("does not exist"));
        assert!(json_patch(&mut n, &json!({"op": "add"}))
            .unwrap_err()
            .contains("array"));
        assert!(
            json_patch(&mut n, &json!([{"op": "move", "path": "/a", "from": "/b"}]))
                .unwrap_err()
                .contains("unsupported")
        );
    }

    #[test]
    fn dates_are_rfc3339() {
        let d = now_rfc3339();
        assert_eq!(d.len(), 20, "{d}");
        assert!(
            d.starts_with("20") && d.ends_with('Z') && d.as_bytes()[10] == b'T',
            "{d}"
        );
    }
}
