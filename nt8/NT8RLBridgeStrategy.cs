// NT8RLBridgeStrategy: NinjaTrader 8 side of the NT8 bridge, protocol version 1 (nt8/PROTOCOL.md).
// Sends each closed bar, applies the decision's target position with market orders, reports fills
// and positions, sends heartbeats, reconnects with backoff, goes flat on a kill message.
// Install: see nt8/README.md. It cannot be compiled outside NinjaTrader; keep it faithful to PROTOCOL.md.
#region Using declarations
using System;
using System.ComponentModel.DataAnnotations;
using System.Globalization;
using System.IO;
using System.Net.Security;
using System.Net.Sockets;
using System.Text;
using System.Threading;
using NinjaTrader.Cbi;
using NinjaTrader.NinjaScript;
#endregion

namespace NinjaTrader.NinjaScript.Strategies
{
    public class NT8RLBridgeStrategy : Strategy
    {
        [NinjaScriptProperty, Display(Name = "Host", Order = 1, GroupName = "Bridge")]
        public string Host { get; set; }
        [NinjaScriptProperty, Display(Name = "Port", Order = 2, GroupName = "Bridge")]
        public int Port { get; set; }
        [NinjaScriptProperty, Display(Name = "Token (empty: env NT8_BRIDGE_TOKEN)", Order = 3, GroupName = "Bridge")]
        public string Token { get; set; }
        [NinjaScriptProperty, Display(Name = "Use TLS", Order = 4, GroupName = "Bridge")]
        public bool UseTls { get; set; }
        [NinjaScriptProperty, Display(Name = "Decision timeout (ms)", Order = 5, GroupName = "Bridge")]
        public int DecisionTimeoutMs { get; set; }

        private const int Protocol = 1;
        private readonly object io = new object();
        private TcpClient client;
        private StreamReader reader;
        private StreamWriter writer;
        private Timer heartbeat;
        private DateTime nextConnect = DateTime.MinValue;
        private int backoffMs = 1000;
        private string decisionId = "";
        private volatile bool killed;

        protected override void OnStateChange()
        {
            if (State == State.SetDefaults)
            {
                Name = "NT8RLBridgeStrategy";
                Calculate = Calculate.OnBarClose;
                EntriesPerDirection = 100;
                EntryHandling = EntryHandling.AllEntries;
                IsExitOnSessionCloseStrategy = false;
                BarsRequiredToTrade = 0;
                Host = "127.0.0.1";
                Port = 5555;
                Token = "";
                UseTls = false;
                DecisionTimeoutMs = 2000;
            }
            else if (State == State.DataLoaded)
            {
                heartbeat = new Timer(_ => { try { Request("{\"type\":\"heartbeat\"}"); } catch (Exception) { } }, null, 10000, 10000);
            }
            else if (State == State.Terminated)
            {
                if (heartbeat != null) heartbeat.Dispose();
                try { Request("{\"type\":\"bye\"}"); } catch (Exception) { }
                Disconnect();
            }
        }

        protected override void OnBarUpdate()
        {
            if (BarsInProgress != 0) return;
            bool historical = State == State.Historical;
            string bar = string.Format(CultureInfo.InvariantCulture,
                "{{\"type\":\"bar\",\"time\":\"{0:yyyy-MM-ddTHH:mm:ss}\",\"open\":{1},\"high\":{2},\"low\":{3},\"close\":{4},\"volume\":{5},\"historical\":{6}}}",
                Time[0], Open[0], High[0], Low[0], Close[0], Volume[0], historical ? "true" : "false");
            string reply = Request(bar);
            if (reply == null || Field(reply, "type") != "decision") return;  // not connected, or an error (logged)
            decisionId = Field(reply, "decision_id");
            if (historical || killed) return;
            ApplyTarget(int.Parse(Field(reply, "target_position"), CultureInfo.InvariantCulture));
        }

        // Buy or sell the difference to the target at market (managed orders reverse a position).
        private void ApplyTarget(int target)
        {
            int current = Position.MarketPosition == MarketPosition.Long ? Position.Quantity
                        : Position.MarketPosition == MarketPosition.Short ? -Position.Quantity : 0;
            if (target == current) return;
            if (target == 0) { if (current > 0) ExitLong(); else ExitShort(); }
            else if (target > 0) { if (current < 0) EnterLong(target, "rl"); else if (target > current) EnterLong(target - current, "rl"); else ExitLong(current - target); }
            else { if (current > 0) EnterShort(-target, "rl"); else if (target < current) EnterShort(current - target, "rl"); else ExitShort(target - current); }
        }

        protected override void OnExecutionUpdate(Execution execution, string executionId, double price, int quantity,
                                                  MarketPosition marketPosition, string orderId, DateTime time)
        {
            OrderAction action = execution.Order.OrderAction;
            int signed = action == OrderAction.Buy || action == OrderAction.BuyToCover ? quantity : -quantity;
            Request(string.Format(CultureInfo.InvariantCulture,
                "{{\"type\":\"fill\",\"decision_id\":\"{0}\",\"time\":\"{1:yyyy-MM-ddTHH:mm:ss}\",\"price\":{2},\"quantity\":{3},\"commission\":{4}}}",
                decisionId, time, price, signed, execution.Commission));
        }

        protected override void OnPositionUpdate(Position position, double averagePrice, int quantity, MarketPosition marketPosition)
        {
            int signed = marketPosition == MarketPosition.Long ? quantity : marketPosition == MarketPosition.Short ? -quantity : 0;
            Request(string.Format(CultureInfo.InvariantCulture, "{{\"type\":\"position\",\"position\":{0},\"avg_price\":{1}}}",
                                  signed, averagePrice));
        }

        // One request, one reply; a kill pushed meanwhile flattens. Null when the bridge cannot be reached.
        private string Request(string message)
        {
            lock (io)
            {
                if (client == null && !Connect()) return null;
                try
                {
                    writer.Write(message + "\n");
                    writer.Flush();
                    while (true)
                    {
                        string line = reader.ReadLine();
                        if (line == null) throw new IOException("the bridge closed the connection");
                        string type = Field(line, "type");
                        if (type == "kill") { OnKill(Field(line, "reason")); continue; }
                        if (type == "error") Print("NT8 bridge error " + Field(line, "code") + ": " + Field(line, "message"));
                        return line;
                    }
                }
                catch (Exception e)
                {
                    Print("NT8 bridge: " + e.Message + "; reconnecting in " + backoffMs + " ms");
                    Disconnect();
                    nextConnect = DateTime.UtcNow.AddMilliseconds(backoffMs);
                    backoffMs = Math.Min(backoffMs * 2, 60000);
                    return null;
                }
            }
        }

        private bool Connect()
        {
            if (DateTime.UtcNow < nextConnect) return false;
            try
            {
                client = new TcpClient(Host, Port) { NoDelay = true, ReceiveTimeout = DecisionTimeoutMs, SendTimeout = DecisionTimeoutMs };
                Stream stream = client.GetStream();
                if (UseTls) { var ssl = new SslStream(stream, false); ssl.AuthenticateAsClient(Host); stream = ssl; }
                reader = new StreamReader(stream, new UTF8Encoding(false));
                writer = new StreamWriter(stream, new UTF8Encoding(false));
                string token = string.IsNullOrEmpty(Token) ? Environment.GetEnvironmentVariable("NT8_BRIDGE_TOKEN") : Token;
                writer.Write(string.Format(CultureInfo.InvariantCulture,
                    "{{\"type\":\"hello\",\"protocol\":{0},\"token\":\"{1}\",\"instrument\":\"{2}\",\"bar_period\":\"{3}\",\"account\":\"{4}\",\"source\":\"live\"}}\n",
                    Protocol, Escape(token ?? ""), Instrument.MasterInstrument.Name, BarPeriodText(), Escape(Account.Name)));
                writer.Flush();
                string welcome = reader.ReadLine();
                if (welcome == null || Field(welcome, "type") != "welcome")
                {
                    Print("NT8 bridge refused the session: " + welcome);
                    Disconnect();
                    nextConnect = DateTime.UtcNow.AddMilliseconds(backoffMs);
                    backoffMs = Math.Min(backoffMs * 2, 60000);
                    return false;
                }
                backoffMs = 1000;
                Print("NT8 bridge: connected, model version " + Field(welcome, "model_version"));
                return true;
            }
            catch (Exception e)
            {
                Print("NT8 bridge: cannot connect (" + e.Message + ")");
                Disconnect();
                nextConnect = DateTime.UtcNow.AddMilliseconds(backoffMs);
                backoffMs = Math.Min(backoffMs * 2, 60000);
                return false;
            }
        }

        private void Disconnect()
        {
            try { if (client != null) client.Close(); } catch (Exception) { }
            client = null;
        }

        private void OnKill(string reason)
        {
            killed = true;
            Print("NT8 bridge: KILL (" + reason + "): flattening");
            TriggerCustomEvent(_ => { if (Position.MarketPosition == MarketPosition.Long) ExitLong(); else if (Position.MarketPosition == MarketPosition.Short) ExitShort(); }, null);
        }

        private string BarPeriodText()
        {
            int value = BarsPeriod.Value;
            switch (BarsPeriod.BarsPeriodType)
            {
                case BarsPeriodType.Second: return value + "s";
                case BarsPeriodType.Minute: return value + "min";
                case BarsPeriodType.Day: return value + "D";
                default: return value + BarsPeriod.BarsPeriodType.ToString();
            }
        }

        private static string Escape(string s) { return s.Replace("\\", "\\\\").Replace("\"", "\\\""); }

        // The raw value of a top-level field of a flat JSON object ("" when absent, strings unquoted).
        private static string Field(string json, string key)
        {
            int at = json.IndexOf("\"" + key + "\":", StringComparison.Ordinal);
            if (at < 0) return "";
            int i = at + key.Length + 3;
            while (i < json.Length && json[i] == ' ') i++;
            if (i < json.Length && json[i] == '"')
            {
                var sb = new StringBuilder();
                for (i++; i < json.Length && json[i] != '"'; i++) { if (json[i] == '\\' && i + 1 < json.Length) i++; sb.Append(json[i]); }
                return sb.ToString();
            }
            int end = i;
            while (end < json.Length && json[end] != ',' && json[end] != '}') end++;
            return json.Substring(i, end - i).Trim();
        }
    }
}
