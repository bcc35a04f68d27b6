//! Advantage estimators (being written).
