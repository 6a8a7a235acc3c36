//! Secondary authorization over `requestMetadata` (the specification's "Authorization"):
//! a mapped key may list rules; a request is allowed by the first rule all of whose lists
//! match, and that rule's name goes into the audit record. No rules: every request that
//! passed SigV4 (and the key's grants) is allowed. Health is never subject to it.

use super::api::RequestMetadata;
use super::settings::Rule;

/// The decision, with the rule responsible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The key has no rules.
    NoRules,
    /// Allowed by this rule.
    Allowed(String),
    /// No rule matched.
    Denied,
}

/// `*` matches any run of characters (including none); everything else matches itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|b| *b == b'*')
}

fn list_matches(list: &Option<Vec<String>>, value: Option<&str>) -> bool {
    match list {
        None => true,
        Some(patterns) => value.is_some_and(|v| patterns.iter().any(|p| glob(p, v))),
    }
}

/// Decides `meta` against `rules`.
pub fn decide(rules: &[Rule], meta: &RequestMetadata) -> Decision {
    if rules.is_empty() {
        return Decision::NoRules;
    }
    rules
        .iter()
        .find(|r| {
            list_matches(&r.principals, meta.aws_principal_arn.as_deref())
                && list_matches(&r.operations, Some(meta.kms_operation.as_str()))
                && list_matches(&r.via_services, meta.kms_via_service.as_deref())
                && list_matches(&r.source_vpcs, meta.aws_source_vpc.as_deref())
                && list_matches(&r.vpc_endpoints, meta.aws_source_vpce.as_deref())
        })
        .map_or(Decision::Denied, |r| Decision::Allowed(r.name.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, t, m) in [
            ("abc", "abc", true),
            ("abc", "abd", false),
            ("*", "", true),
            ("*", "anything", true),
            (
                "arn:aws:iam::111122223333:role/*",
                "arn:aws:iam::111122223333:role/app",
                true,
            ),
            (
                "arn:aws:iam::111122223333:role/*",
                "arn:aws:iam::999922223333:role/app",
                false,
            ),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("*amazonaws.com", "s3.amazonaws.com", true),
            ("a**", "a", true),
            ("", "", true),
            ("", "x", false),
        ] {
            assert_eq!(glob(p, t), m, "{p} ~ {t}");
        }
    }

    fn meta(principal: &str, op: &str, via: Option<&str>) -> RequestMetadata {
        RequestMetadata {
            aws_principal_arn: Some(principal.into()),
            kms_operation: op.into(),
            kms_request_id: "r".into(),
            kms_via_service: via.map(str::to_owned),
            ..RequestMetadata::default()
        }
    }

    #[test]
    fn first_matching_rule_decides() {
        let rules: Vec<Rule> = toml::from_str::<std::collections::BTreeMap<String, Vec<Rule>>>(
            r#"
            [[r]]
            name = "s3-only"
            principals = ["arn:aws:iam::111122223333:*"]
            operations = ["Encrypt", "Decrypt", "GenerateDataKey*"]
            via_services = ["s3"]
            [[r]]
            name = "describe"
            operations = ["DescribeKey", "CreateKey"]
            "#,
        )
        .unwrap()
        .remove("r")
        .unwrap();
        let alice = "arn:aws:iam::111122223333:user/Alice";
        assert_eq!(
            decide(&[], &meta(alice, "Encrypt", None)),
            Decision::NoRules
        );
        assert_eq!(
            decide(
                &rules,
                &meta(alice, "GenerateDataKeyWithoutPlaintext", Some("s3"))
            ),
            Decision::Allowed("s3-only".into())
        );
        // Not via S3, another account, another operation: no rule.
        assert_eq!(
            decide(&rules, &meta(alice, "Encrypt", Some("ebs"))),
            Decision::Denied
        );
        assert_eq!(
            decide(&rules, &meta(alice, "Encrypt", None)),
            Decision::Denied
        );
        assert_eq!(
            decide(
                &rules,
                &meta("arn:aws:iam::999:user/M", "Decrypt", Some("s3"))
            ),
            Decision::Denied
        );
        assert_eq!(
            decide(&rules, &meta("anyone", "DescribeKey", None)),
            Decision::Allowed("describe".into())
        );
    }
}
