//! CPU reference backend (to be written).
