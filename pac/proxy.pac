// maintgate proxy auto-config: every *.{{DOMAIN}} URL goes through the
// broker; everything else goes direct.
function FindProxyForURL(url, host) {
  if (dnsDomainIs(host, ".{{DOMAIN}}")) return "HTTPS {{PROXY_HOST}}:{{PROXY_PORT}}";
  return "DIRECT";
}
