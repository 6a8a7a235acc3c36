//! The tools layer: dev mode, the throwaway PKI, and the fuzz targets' entry points.

pub mod dev;
pub mod fuzzing;
pub mod pki;
