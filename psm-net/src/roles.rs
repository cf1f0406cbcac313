//! The role table: which certificate roles may call which RPC. Kept in this one place and
//! enforced for every request by [`crate::auth::AuthLayer`], so a handler cannot forget it;
//! `docs/roles.md` shows the same table.

use crate::Role;

/// GRPC paths open to any authenticated caller of the trust domain (health and reflection).
pub const OPEN_PREFIXES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// Every RPC of the psm.v1 API with the roles allowed to call it. An RPC missing here is
/// refused for everyone (deny by default).
pub const ROLE_TABLE: &[(&str, &[Role])] = &[
    (
        "/psm.v1.Ingest/SubmitReadings",
        &[Role::Meter, Role::Headend],
    ),
    ("/psm.v1.Ingest/Enroll", &[Role::Meter, Role::Headend]),
    (
        "/psm.v1.Ingest/StreamReadings",
        &[Role::Compute, Role::Keyshare],
    ),
    ("/psm.v1.Ingest/StreamEnrollments", &[Role::Keyshare]),
    (
        "/psm.v1.Ingest/GetPublicParams",
        &[
            Role::Meter,
            Role::Headend,
            Role::Compute,
            Role::Keyshare,
            Role::Operator,
            Role::Auditor,
        ],
    ),
    ("/psm.v1.Compute/Bill", &[Role::Operator]),
    ("/psm.v1.Compute/Aggregate", &[Role::Operator]),
    ("/psm.v1.Compute/Analytics", &[Role::Operator]),
    ("/psm.v1.Compute/WatchJob", &[Role::Operator]),
    ("/psm.v1.Keyshare/Release", &[Role::Compute]),
    ("/psm.v1.Keyshare/PartialDecrypt", &[Role::Compute]),
    ("/psm.v1.Keyshare/GetAuditLog", &[Role::Auditor]),
    (
        "/psm.v1.Keyshare/GetReceipts",
        &[Role::Meter, Role::Headend],
    ),
    ("/psm.v1.Keyshare/ConfirmEnrollments", &[Role::Keyshare]),
    ("/psm.v1.Keyshare/ConfirmRelease", &[Role::Keyshare]),
    ("/psm.v1.Keyshare/GetReleaseRecords", &[Role::Keyshare]),
    (
        "/psm.v1.Keyshare/Status",
        &[Role::Operator, Role::Auditor, Role::Compute],
    ),
];

/// The outcome of looking a path up in the table.
#[derive(Debug, PartialEq, Eq)]
pub enum Access {
    /// Any authenticated caller.
    Open,
    /// Only these roles.
    Roles(&'static [Role]),
    /// Not part of the API: refused.
    Unknown,
}

/// Looks up who may call `path` (`/package.Service/Method`).
pub fn access_for(path: &str) -> Access {
    if OPEN_PREFIXES.iter().any(|p| path.starts_with(p)) {
        return Access::Open;
    }
    ROLE_TABLE
        .iter()
        .find(|(p, _)| *p == path)
        .map_or(Access::Unknown, |(_, roles)| Access::Roles(roles))
}

/// Renders the table as Markdown, for `psm roles` and the docs.
pub fn table_markdown() -> String {
    let mut s = String::from("| RPC | allowed roles |\n|---|---|\n");
    for (path, roles) in ROLE_TABLE {
        let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        s.push_str(&format!("| `{path}` | {} |\n", names.join(", ")));
    }
    s.push_str("| health, reflection | any certificate of the trust domain |\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_the_proto() {
        // Every method of the generated services must have an entry, and no entry may be stale.
        use prost::Message;
        let fds = prost_types::FileDescriptorSet::decode(psm_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut paths = Vec::new();
        for file in &fds.file {
            for svc in &file.service {
                for m in &svc.method {
                    paths.push(format!("/{}.{}/{}", file.package(), svc.name(), m.name()));
                }
            }
        }
        paths.sort();
        let mut table: Vec<String> = ROLE_TABLE.iter().map(|(p, _)| p.to_string()).collect();
        table.sort();
        assert_eq!(paths, table);
    }

    #[test]
    fn lookups() {
        assert_eq!(
            access_for("/psm.v1.Keyshare/PartialDecrypt"),
            Access::Roles(&[Role::Compute])
        );
        assert_eq!(access_for("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(access_for("/psm.v1.Keyshare/Nope"), Access::Unknown);
    }
}
