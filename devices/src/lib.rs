//! keel device models.
