//! The access layer: who a caller is (identity → tenant and role) and whether it is locked
//! out.

pub mod approvals;
pub mod lockout;
pub mod policy;
