//! Everything that can end an exchange early, which side caused it, and the one place where each
//! becomes a status code.

use crate::http1::request::HeadError;
use crate::metrics::UpstreamErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client's head was refused by `http1::request`.
    #[error("{0}")]
    Head(#[from] HeadError),
    #[error("no route matches this request")]
    NoRoute,
    #[error("request body larger than this route allows")]
    BodyTooLarge,
    #[error("malformed request body: {0}")]
    ClientBody(&'static str),
    #[error("client sent the request body too slowly")]
    ClientTimeout,
    /// The client went away mid-request; there is no one to answer.
    #[error("client closed the connection")]
    ClientGone,
    #[error("no upstream server available")]
    NoServers,
    #[error("every upstream server is at its connection limit")]
    Saturated,
    #[error("upstream failed: {}", .0.as_str())]
    Upstream(UpstreamErrorKind),
}

impl ProxyError {
    /// The status answered to the client; for `ClientGone`, the one logged (nginx's 499).
    pub fn status(&self) -> u16 {
        match self {
            ProxyError::Head(HeadError::Malformed(_)) => 400,
            ProxyError::Head(HeadError::HeaderTooLarge) => 431,
            ProxyError::Head(HeadError::UriTooLong) => 414,
            ProxyError::Head(HeadError::UnsupportedCoding) => 501,
            ProxyError::Head(HeadError::UnsupportedExpectation) => 417,
            ProxyError::NoRoute => 404,
            ProxyError::BodyTooLarge => 413,
            ProxyError::ClientBody(_) => 400,
            ProxyError::ClientTimeout => 408,
            ProxyError::ClientGone => 499,
            ProxyError::NoServers | ProxyError::Saturated => 503,
            ProxyError::Upstream(
                UpstreamErrorKind::Timeout | UpstreamErrorKind::ConnectTimeout,
            ) => 504,
            ProxyError::Upstream(_) => 502,
        }
    }

    /// Whether anything can be sent back at all.
    pub fn has_response(&self) -> bool {
        !matches!(self, ProxyError::ClientGone)
    }

    /// The short body of the error response: the status and what happened, nothing internal.
    pub fn body(&self) -> String {
        let status = self.status();
        format!(
            "{} {}: {}\n",
            status,
            crate::http1::write::reason(status),
            self
        )
    }
}
