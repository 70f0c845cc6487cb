//! The engine's [`Transport`] over the native HTTP client, for Rust programs
//! (the Lua binding goes through the Lua transport object instead, so that
//! mocks and monkeypatches keep working).

use tokio::runtime::Handle;

use crate::patch::PATCH;
use crate::state::operation_value;
use crate::transport::http::HttpTransport;

use super::{with_content, ContentSource, FetchPage, HostError, PushReply, Transport};
use crate::protocol::Operation;

/// [`HttpTransport`] driven to completion on a tokio runtime.
pub struct HttpLink {
    transport: HttpTransport,
    runtime: Handle,
    /// Operations per fetch page.
    page_size: u64,
}

impl HttpLink {
    /// `runtime` must not be the runtime of the calling thread (the link blocks).
    pub fn new(transport: HttpTransport, runtime: Handle, page_size: u64) -> Self {
        HttpLink {
            transport,
            runtime,
            page_size,
        }
    }

    pub fn transport(&self) -> &HttpTransport {
        &self.transport
    }
}

impl Transport for HttpLink {
    fn fetch(
        &mut self,
        device_id: &str,
        since: u64,
        patches: bool,
    ) -> Result<FetchPage, HostError> {
        let before = self.transport.traffic();
        let page = self
            .runtime
            .block_on(
                self.transport
                    .fetch_page(device_id, since, Some(self.page_size), patches),
            )
            .map_err(|e| HostError(e.to_string()))?;
        let operations = page
            .operations
            .iter()
            .map(operation_value)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| HostError(e.to_string()))?;
        Ok(FetchPage {
            operations,
            version: page.version,
            has_more: page.has_more,
            bytes_received: self.transport.traffic().received - before.received,
            accepts_patches: page.features.iter().any(|f| f == PATCH),
        })
    }

    fn push(
        &mut self,
        device_id: &str,
        operations: &[Operation],
        content: &mut ContentSource<'_>,
    ) -> Result<PushReply, HostError> {
        let operations = with_content(operations, content)?;
        let before = self.transport.traffic();
        let answer = self
            .runtime
            .block_on(self.transport.push_operations(device_id, &operations))
            .map_err(|e| HostError(e.to_string()))?;
        let after = self.transport.traffic();
        Ok(PushReply::from_response(
            answer,
            after.sent - before.sent,
            after.received - before.received,
        ))
    }
}
