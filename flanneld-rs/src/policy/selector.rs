//! Kubernetes label selectors (`metav1.LabelSelector`), evaluated the way
//! the API defines them: `matchLabels` AND every `matchExpressions`
//! requirement; the empty selector matches everything.

use std::collections::BTreeMap;

/// Labels of a pod or namespace.
pub type Labels = BTreeMap<String, String>;

/// A `matchExpressions` operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operator {
    /// The key is present and its value is one of `values`.
    In,
    /// The key is absent, or its value is none of `values`.
    NotIn,
    /// The key is present (any value).
    Exists,
    /// The key is absent.
    DoesNotExist,
}

impl Operator {
    /// Parses the API spelling (case-sensitive, as the API server is).
    pub fn parse(s: &str) -> Option<Operator> {
        match s {
            "In" => Some(Operator::In),
            "NotIn" => Some(Operator::NotIn),
            "Exists" => Some(Operator::Exists),
            "DoesNotExist" => Some(Operator::DoesNotExist),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Operator::In => "In",
            Operator::NotIn => "NotIn",
            Operator::Exists => "Exists",
            Operator::DoesNotExist => "DoesNotExist",
        }
    }
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    /// The label key.
    pub key: String,
    /// How the key and values are compared.
    pub operator: Operator,
    /// Values for `In` and `NotIn`; empty for the other two.
    pub values: Vec<String>,
}

impl Requirement {
    /// Whether `labels` satisfy this requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }

    /// Whether the API server would accept it: `In`/`NotIn` need values,
    /// `Exists`/`DoesNotExist` must have none.
    fn is_valid(&self) -> bool {
        match self.operator {
            Operator::In | Operator::NotIn => !self.values.is_empty(),
            Operator::Exists | Operator::DoesNotExist => self.values.is_empty(),
        }
    }
}

/// A label selector. An invalid one (an unknown operator, `In` without
/// values) selects nothing, as `LabelSelectorAsSelector` failing does in
/// Kubernetes; the API server rejects such policies anyway.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    /// `matchLabels`: every pair must be present.
    pub match_labels: Labels,
    /// `matchExpressions`: every requirement must hold.
    pub expressions: Vec<Requirement>,
    /// Set when the selector could not be understood; it then selects nothing.
    pub invalid: bool,
}

impl Selector {
    /// The empty selector: matches everything.
    pub fn everything() -> Selector {
        Selector::default()
    }

    /// A selector that matches nothing (for invalid input).
    pub fn nothing() -> Selector {
        Selector { invalid: true, ..Selector::default() }
    }

    /// `matchLabels` only.
    pub fn labels<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Selector {
        let match_labels = pairs.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Selector { match_labels, ..Selector::default() }
    }

    /// Adds a `matchExpressions` requirement.
    pub fn with_expr(mut self, key: &str, operator: Operator, values: &[&str]) -> Selector {
        let values = values.iter().map(|v| v.to_string()).collect();
        self.expressions.push(Requirement { key: key.to_string(), operator, values });
        self
    }

    /// Whether `labels` are selected.
    pub fn matches(&self, labels: &Labels) -> bool {
        if self.invalid || self.expressions.iter().any(|r| !r.is_valid()) {
            return false;
        }
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|r| r.matches(labels))
    }

    /// A canonical text for the selector: equal for selectors that differ
    /// only in the order of expressions or values. Set names hash it.
    pub fn canonical(&self) -> String {
        if self.invalid {
            return "!invalid".to_string();
        }
        let mut parts: Vec<String> = self.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut exprs: Vec<String> = self
            .expressions
            .iter()
            .map(|r| {
                let mut values = r.values.clone();
                values.sort();
                values.dedup();
                format!("{} {} ({})", r.key, r.operator.as_str(), values.join(","))
            })
            .collect();
        exprs.sort();
        exprs.dedup();
        parts.extend(exprs);
        format!("{{{}}}", parts.join(";"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn policy_selector_semantics_table() {
        use Operator::*;
        let app_web = labels(&[("app", "web"), ("tier", "front")]);
        let app_db = labels(&[("app", "db")]);
        let none = labels(&[]);
        // (selector, labels, expected)
        let cases: Vec<(Selector, &Labels, bool)> = vec![
            (Selector::everything(), &none, true),
            (Selector::everything(), &app_web, true),
            (Selector::nothing(), &app_web, false),
            (Selector::labels([("app", "web")]), &app_web, true),
            (Selector::labels([("app", "web")]), &app_db, false),
            (Selector::labels([("app", "web")]), &none, false),
            (Selector::labels([("app", "web"), ("tier", "front")]), &app_web, true),
            (Selector::labels([("app", "web"), ("tier", "back")]), &app_web, false),
            (Selector::everything().with_expr("app", In, &["web", "db"]), &app_db, true),
            (Selector::everything().with_expr("app", In, &["web", "db"]), &none, false),
            (Selector::everything().with_expr("app", NotIn, &["web"]), &app_db, true),
            (Selector::everything().with_expr("app", NotIn, &["web"]), &app_web, false),
            // NotIn is satisfied by a missing key.
            (Selector::everything().with_expr("app", NotIn, &["web"]), &none, true),
            (Selector::everything().with_expr("tier", Exists, &[]), &app_web, true),
            (Selector::everything().with_expr("tier", Exists, &[]), &app_db, false),
            (Selector::everything().with_expr("tier", DoesNotExist, &[]), &app_db, true),
            (Selector::everything().with_expr("tier", DoesNotExist, &[]), &app_web, false),
            // matchLabels AND matchExpressions.
            (Selector::labels([("app", "web")]).with_expr("tier", DoesNotExist, &[]), &app_web, false),
            (Selector::labels([("app", "web")]).with_expr("tier", In, &["front"]), &app_web, true),
            // Invalid requirements select nothing (the API server would reject them).
            (Selector::everything().with_expr("app", In, &[]), &app_web, false),
            (Selector::everything().with_expr("app", NotIn, &[]), &none, false),
            (Selector::everything().with_expr("app", Exists, &["web"]), &app_web, false),
        ];
        for (i, (sel, l, want)) in cases.iter().enumerate() {
            assert_eq!(sel.matches(l), *want, "case {i}: {} on {l:?}", sel.canonical());
        }
    }

    #[test]
    fn policy_selector_canonical_ignores_order() {
        let a = Selector::labels([("b", "2"), ("a", "1")]).with_expr("k", Operator::In, &["y", "x"]).with_expr(
            "j",
            Operator::Exists,
            &[],
        );
        let b = Selector::labels([("a", "1"), ("b", "2")]).with_expr("j", Operator::Exists, &[]).with_expr(
            "k",
            Operator::In,
            &["x", "y", "x"],
        );
        assert_eq!(a.canonical(), b.canonical());
        assert_eq!(a.canonical(), "{a=1;b=2;j Exists ();k In (x,y)}");
        assert_ne!(Selector::everything().canonical(), Selector::nothing().canonical());
    }
}
