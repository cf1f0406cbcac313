//! Meter data from outside the system: importers for real utility files, turned into UTC
//! meter-days with a per-day account of what was kept, and a deterministic town simulator.

pub mod import;
pub mod simulate;
