//! The proxy auto-config file, rendered from `pac/proxy.pac`.
//!
//! Placeholders: `{{DOMAIN}}` (the maint domain, e.g. `maint.example.com`),
//! `{{PROXY_HOST}}` and `{{PROXY_PORT}}` (where browsers send CONNECT).

/// The template, compiled in so the binary needs no files at run time.
pub const TEMPLATE: &str = include_str!("../pac/proxy.pac");

/// Render the PAC for `domain`, proxied through `proxy_host:proxy_port`.
pub fn render(domain: &str, proxy_host: &str, proxy_port: u16) -> String {
    TEMPLATE
        .replace("{{DOMAIN}}", domain)
        .replace("{{PROXY_HOST}}", proxy_host)
        .replace("{{PROXY_PORT}}", &proxy_port.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_brief_rule() {
        let pac = super::render("maint.example.com", "maint.example.com", 6443);
        assert!(pac.contains(
            r#"if (dnsDomainIs(host, ".maint.example.com")) return "HTTPS maint.example.com:6443";"#
        ));
        assert!(pac.contains(r#"return "DIRECT";"#));
        assert!(!pac.contains("{{"));
    }
}
