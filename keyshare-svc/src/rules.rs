//! The keyshare's rules: every decision it records names one of these, and a refusal's message
//! starts with the rule's name. The index table in docs/keyshare-policy.md is generated from
//! [`Rule::ALL`] ([`markdown_index`]) and a test keeps the two identical.

use tonic::Code;

/// A rule a request can be refused by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    RateLimit,
    WellFormed,
    KnownKey,
    SizeLimit,
    ManifestRequired,
    Manifest,
    Release,
    LinearTrack,
    AllowedProgram,
    Registry,
    KAnonymity,
    BillShape,
    BillPeriod,
    BillingCycle,
    PriceSeries,
    AnalyticsShape,
    BandWidth,
    NoiseBound,
    OutputHash,
    OneBillPerPeriod,
    Differencing,
    CohortBills,
    Enrollment,
    ReExecution,
    InputPinned,
    DeviceSignature,
    CoHolder,
    CoHolderConflict,
    Available,
    Internal,
}

impl Rule {
    /// Every rule, in the order of the docs' index.
    pub const ALL: [Rule; 30] = [
        Rule::RateLimit,
        Rule::WellFormed,
        Rule::KnownKey,
        Rule::SizeLimit,
        Rule::ManifestRequired,
        Rule::Manifest,
        Rule::Release,
        Rule::LinearTrack,
        Rule::AllowedProgram,
        Rule::Registry,
        Rule::KAnonymity,
        Rule::BillShape,
        Rule::BillPeriod,
        Rule::BillingCycle,
        Rule::PriceSeries,
        Rule::AnalyticsShape,
        Rule::BandWidth,
        Rule::NoiseBound,
        Rule::OutputHash,
        Rule::OneBillPerPeriod,
        Rule::Differencing,
        Rule::CohortBills,
        Rule::Enrollment,
        Rule::ReExecution,
        Rule::InputPinned,
        Rule::DeviceSignature,
        Rule::CoHolder,
        Rule::CoHolderConflict,
        Rule::Available,
        Rule::Internal,
    ];

    /// The name recorded in the audit log and starting every refusal's message.
    pub fn name(self) -> &'static str {
        match self {
            Rule::RateLimit => "rate-limit",
            Rule::WellFormed => "well-formed",
            Rule::KnownKey => "known-key",
            Rule::SizeLimit => "size-limit",
            Rule::ManifestRequired => "manifest-required",
            Rule::Manifest => "manifest",
            Rule::Release => "release",
            Rule::LinearTrack => "linear-track",
            Rule::AllowedProgram => "allowed-program",
            Rule::Registry => "registry",
            Rule::KAnonymity => "k-anonymity",
            Rule::BillShape => "bill-shape",
            Rule::BillPeriod => "bill-period",
            Rule::BillingCycle => "billing-cycle",
            Rule::PriceSeries => "price-series",
            Rule::AnalyticsShape => "analytics-shape",
            Rule::BandWidth => "band-width",
            Rule::NoiseBound => "noise-bound",
            Rule::OutputHash => "output-hash",
            Rule::OneBillPerPeriod => "one-bill-per-period",
            Rule::Differencing => "differencing",
            Rule::CohortBills => "cohort-bills",
            Rule::Enrollment => "enrollment",
            Rule::ReExecution => "re-execution",
            Rule::InputPinned => "input-pinned",
            Rule::DeviceSignature => "device-signature",
            Rule::CoHolder => "co-holder",
            Rule::CoHolderConflict => "co-holder-conflict",
            Rule::Available => "available",
            Rule::Internal => "internal",
        }
    }

    /// The status codes a refusal by this rule carries (the first is the usual one).
    pub fn codes(self) -> &'static [Code] {
        match self {
            Rule::RateLimit | Rule::SizeLimit => &[Code::ResourceExhausted],
            Rule::WellFormed | Rule::Release | Rule::NoiseBound => &[Code::InvalidArgument],
            Rule::KnownKey => &[Code::NotFound],
            Rule::Manifest => &[Code::InvalidArgument, Code::FailedPrecondition],
            Rule::AllowedProgram => &[Code::PermissionDenied],
            Rule::ReExecution => &[Code::FailedPrecondition, Code::Unavailable, Code::Internal],
            Rule::Available => &[Code::Unavailable],
            Rule::CoHolder => &[Code::FailedPrecondition, Code::Unavailable],
            Rule::DeviceSignature | Rule::CoHolderConflict => &[Code::PermissionDenied],
            Rule::Internal => &[Code::Internal, Code::Unavailable],
            Rule::ManifestRequired
            | Rule::LinearTrack
            | Rule::Registry
            | Rule::KAnonymity
            | Rule::BillShape
            | Rule::BillPeriod
            | Rule::BillingCycle
            | Rule::PriceSeries
            | Rule::AnalyticsShape
            | Rule::BandWidth
            | Rule::OutputHash
            | Rule::OneBillPerPeriod
            | Rule::Differencing
            | Rule::CohortBills
            | Rule::InputPinned
            | Rule::Enrollment => &[Code::FailedPrecondition],
        }
    }

    /// Which requests the rule judges.
    pub fn applies_to(self) -> &'static str {
        match self {
            Rule::RateLimit | Rule::Available | Rule::Internal | Rule::AllowedProgram => "both",
            Rule::CoHolder | Rule::CoHolderConflict => "both",
            Rule::KAnonymity
            | Rule::BillPeriod
            | Rule::BillingCycle
            | Rule::Differencing
            | Rule::OneBillPerPeriod
            | Rule::NoiseBound => "both",
            Rule::Release
            | Rule::LinearTrack
            | Rule::Registry
            | Rule::BandWidth
            | Rule::PriceSeries
            | Rule::CohortBills
            | Rule::Enrollment => "Release",
            Rule::DeviceSignature => "enrollments, PartialDecrypt inputs",
            _ => "PartialDecrypt",
        }
    }

    /// One line on what the rule refuses.
    pub fn summary(self) -> &'static str {
        match self {
            Rule::RateLimit => "a caller over `rate_limit_per_minute`",
            Rule::WellFormed => "a malformed request, batch or encoding, or a noise bound other than the key's",
            Rule::KnownKey => "a key id this keyshare does not hold",
            Rule::SizeLimit => "too many ciphertexts or inputs for one request",
            Rule::ManifestRequired => "a decryption that does not name its computation",
            Rule::Manifest => "a manifest that is malformed, not canonical, or names an aggregate",
            Rule::Release => "a linear release that is malformed or not canonical",
            Rule::LinearTrack => "a linear release at a keyshare without `[keyshare] public_dir`",
            Rule::AllowedProgram => "a tariff or query whose hash is not in `allowed_programs` nor that of a file in `allowed_tariffs`",
            Rule::Registry => "a member that is not on this keyshare's registry",
            Rule::KAnonymity => "a cohort with fewer than `min_cohort` (meter-encrypted) members",
            Rule::BillShape => "a tfhe-track bill not of one meter over every day of its period",
            Rule::BillPeriod => "a bill shorter than `min_bill_days` (24-hour days, less an hour for a daylight-saving change, on the linear track)",
            Rule::PriceSeries => "a bill at dynamic prices whose tariff has no approval date before the period, whose prices over it spread wider than `max_price_ratio`, or that take more than 32 levels",
            Rule::BillingCycle => "a bill whose period is not one billing cycle of the meter's registered `billing_day`, in its registered `time_zone` (a tariff in another zone is refused) or else the tariff's",
            Rule::AnalyticsShape => "a histogram not over every day of its range for every member",
            Rule::BandWidth => "a bill band narrower than `min_band_hours_per_week`, or on fewer than `min_band_days` local days",
            Rule::NoiseBound => "an output whose noise, flooding or sum could break decoding",
            Rule::OutputHash => "ciphertexts that are not the manifest's output",
            Rule::OneBillPerPeriod => "a second bill for a billed period, or a re-issue that is not allowed",
            Rule::Differencing => "a release whose difference with an earlier one would isolate fewer than `min_cohort` meters",
            Rule::CohortBills => "a linear bill or aggregate that, with the other, would release a meter's readings finer than a band: an aggregated cohort's members share a billing cycle, their bills' bands and price levels cross only in cells as wide as a band, the members billed for a period are aggregated together, and members left out are released only as an aggregate (min_cohort) or as bills (band-wide parts) would be",
            Rule::Enrollment => "a member without an accepted enrollment for the epoch (also each enrollment decision)",
            Rule::ReExecution => "a tfhe-track output the keyshare's own evaluation does not reproduce",
            Rule::InputPinned => "tfhe-track inputs other than those first released for the same meter-day",
            Rule::DeviceSignature => "an enrollment or tfhe-track input not signed by the meter's registered device key",
            Rule::CoHolder => "a release a co-holder of one of the shares refused, or that cannot be confirmed (co-holder unreachable and not in contact since start)",
            Rule::CoHolderConflict => "recorded, not refused: a release a co-holder answered alone that this keyshare's ledger would have refused",
            Rule::Available => "a request while the keyshare shuts down",
            Rule::Internal => "a request the keyshare could not decide (its store or a task failed)",
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn code_name(c: Code) -> &'static str {
    match c {
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::NotFound => "NOT_FOUND",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::Unavailable => "UNAVAILABLE",
        Code::Internal => "INTERNAL",
        _ => "OTHER",
    }
}

/// The rule index of docs/keyshare-policy.md, as markdown.
pub fn markdown_index() -> String {
    let mut out = String::from("| rule | judges | refuses | status |\n|---|---|---|---|\n");
    for r in Rule::ALL {
        let codes: Vec<&str> = r.codes().iter().map(|c| code_name(*c)).collect();
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            r.name(),
            r.applies_to(),
            r.summary(),
            codes.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index in docs/keyshare-policy.md is exactly the generated one (regenerate it with
    /// `PSM_WRITE_DOCS=1 cargo test -p keyshare-svc rules`).
    #[test]
    fn the_docs_index_is_generated_from_the_rules() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/keyshare-policy.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let (begin, end) = ("<!-- rules:begin -->\n", "<!-- rules:end -->");
        let at = doc.find(begin).expect("rules:begin marker") + begin.len();
        let to = doc.find(end).expect("rules:end marker");
        let want = markdown_index();
        if std::env::var_os("PSM_WRITE_DOCS").is_some() {
            std::fs::write(path, format!("{}{want}{}", &doc[..at], &doc[to..])).unwrap();
            return;
        }
        assert_eq!(
            &doc[at..to],
            want,
            "docs/keyshare-policy.md rule index is stale"
        );
        let names: std::collections::BTreeSet<&str> = Rule::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), Rule::ALL.len(), "two rules share a name");
    }
}
