//! LabelSelector evaluation, for finding the PodDisruptionBudget that covers
//! a pod (the eviction API only says that *a* budget refused).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `labels` satisfy `selector`. An empty selector matches everything,
/// as for a PodDisruptionBudget in policy/v1; an unknown operator matches nothing.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    by_labels && by_expressions
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn match_labels_and_expressions_all_have_to_hold() {
        let pod = labels(&[("app", "web"), ("tier", "front")]);
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![req("tier", "In", &["front", "edge"])]),
        };
        assert!(matches(&sel, &pod));
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![req("tier", "NotIn", &["front"])]),
        };
        assert!(!matches(&sel, &pod));
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "db")])),
            match_expressions: None,
        };
        assert!(!matches(&sel, &pod));
        assert!(
            matches(&LabelSelector::default(), &pod),
            "empty selects all"
        );
        let exists = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![req("tier", "Exists", &[])]),
        };
        assert!(matches(&exists, &pod));
        assert!(!matches(&exists, &labels(&[("app", "web")])));
        let bogus = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![req("tier", "Like", &["front"])]),
        };
        assert!(!matches(&bogus, &pod), "unknown operator must not match");
    }
}
